"""Transport security: credentials never travel in clear text beyond this machine."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from medseg.errors import ConfigError

ALLOW_INSECURE = "MEDSEG_ALLOW_INSECURE_HTTP"
"""Set to ``1`` to send credentials over plain HTTP anyway (a trusted, isolated network)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_clear_text_credentials(url: str, what: str, environ: Mapping[str, str]) -> None:
    """Refuse to send credentials for ``what`` to ``url`` over plain HTTP to another machine.

    Raises:
        ConfigError: ``url`` is ``http://`` to a host other than loopback and
            ``MEDSEG_ALLOW_INSECURE_HTTP`` is not ``1``.

    """
    parts = urlsplit(url)
    if parts.scheme != "http" or is_loopback(parts.hostname or "") or environ.get(ALLOW_INSECURE) == "1":
        return
    raise ConfigError(
        f"{what} credentials would travel unencrypted to {parts.hostname}; use an https:// URL "
        f"(TLS, e.g. a reverse proxy), or set {ALLOW_INSECURE}=1 on an isolated trusted network"
    )
