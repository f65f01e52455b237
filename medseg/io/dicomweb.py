"""A PACS through DICOMweb: find series (QIDO-RS), retrieve them (WADO-RS), store objects (STOW-RS).

Credentials never come from a workflow file: ``credentials_for`` reads them from the
environment (``MEDSEG_DICOMWEB_USER`` / ``MEDSEG_DICOMWEB_PASSWORD``) or a netrc-style file
(``MEDSEG_NETRC``, else ``~/.netrc``) by host, and nothing here logs them. Errors name the
endpoint without credentials.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from medseg.errors import DataError
from medseg.io.dicom import series_key
from medseg.params import Params, identifying_field
from medseg.transport import refuse_clear_text_credentials

_SERIES_UID = "0020000E"
_STUDY_UID = "0020000D"
_SOP_UID = "00080018"
_DESCRIPTION = "0008103E"


class DicomwebQuery(Params):
    """Which series to retrieve: by UID, or by modality, study date range and description.

    ``description`` is a regular expression searched in SeriesDescription (case-insensitive),
    applied to the server's answer. ``max_series`` guards against a query that matches half
    the archive. UIDs are logged to MLflow only as digests.
    """

    study_uid: str | None = identifying_field()
    series_uid: str | None = identifying_field()
    modality: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    description: str | None = None
    max_series: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _narrow(self) -> DicomwebQuery:
        if not any((self.study_uid, self.series_uid, self.modality, self.date_from, self.date_to)):
            raise ValueError(
                "the query matches the whole archive; give study_uid, series_uid, or modality / a date range"
            )
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("date_from is after date_to")
        return self

    def search_filters(self) -> dict[str, str]:
        """QIDO-RS query parameters (the description is matched afterwards)."""
        filters = {}
        if self.study_uid:
            filters["StudyInstanceUID"] = self.study_uid
        if self.series_uid:
            filters["SeriesInstanceUID"] = self.series_uid
        if self.modality:
            filters["Modality"] = self.modality
        if self.date_from or self.date_to:
            low = self.date_from.strftime("%Y%m%d") if self.date_from else ""
            high = self.date_to.strftime("%Y%m%d") if self.date_to else ""
            filters["StudyDate"] = f"{low}-{high}"
        return filters


class DicomwebEndpoint(Params):
    """A DICOMweb service root, e.g. ``http://pacs:8042/dicom-web`` (no credentials in it)."""

    url: str = Field(pattern=r"^https?://")
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if "@" in urlsplit(url).netloc:
            raise ValueError(
                "credentials do not belong in the workflow; set MEDSEG_DICOMWEB_USER and "
                "MEDSEG_DICOMWEB_PASSWORD or a netrc file (MEDSEG_NETRC)"
            )
        return url.rstrip("/")


@dataclass(frozen=True)
class RetrievedInstance:
    """One retrieved instance: where it was written and its content digest (sha256 of the file)."""

    series: str
    sop_instance_uid: str
    path: Path
    sha256: str


def credentials_for(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for ``url`` from the environment or a netrc file, or None.

    Reads ``MEDSEG_DICOMWEB_USER``/``MEDSEG_DICOMWEB_PASSWORD``, else the netrc file named by
    ``MEDSEG_NETRC`` (default ``~/.netrc``) for the URL's host.

    Raises:
        DataError: only one of user and password is set, or the netrc file is malformed.

    """
    env = os.environ if environ is None else environ
    user, password = env.get("MEDSEG_DICOMWEB_USER"), env.get("MEDSEG_DICOMWEB_PASSWORD")
    if user or password:
        if not (user and password):
            raise DataError("set both MEDSEG_DICOMWEB_USER and MEDSEG_DICOMWEB_PASSWORD, or neither")
        return user, password
    path = Path(env.get("MEDSEG_NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(urlsplit(url).hostname or "")
    except netrc.NetrcParseError as exc:
        raise DataError(f"netrc file {path.name}: malformed at line {exc.lineno}; fix it") from exc
    return (entry[0], entry[2] or "") if entry else None


def checked_credentials(
    url: str, what: str, environ: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """``credentials_for(url)``, refused when they would cross the network in clear text.

    Raises:
        DataError: credentials are half set or malformed, or ``url`` is plain HTTP beyond
            loopback while credentials are set (``what`` names the service in the message).

    """
    credentials = credentials_for(url, environ)
    if credentials is not None:
        refuse_clear_text_credentials(url, what, os.environ if environ is None else environ)
    return credentials


@contextmanager
def _talking_to(endpoint: DicomwebEndpoint, action: str) -> Iterator[None]:
    """Turn connection and HTTP failures into one ``DataError`` naming the endpoint."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (check MEDSEG_DICOMWEB_USER/PASSWORD or the netrc file)" if status in (401, 403) else ""
        raise DataError(
            f"DICOMweb server {endpoint.url} answered HTTP {status} to {action}{hint}; nothing was cached"
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DataError(
            f"DICOMweb server {endpoint.url} is unreachable ({type(exc).__name__}) during {action}; "
            "check that the PACS is running and the URL; nothing was cached"
        ) from exc


def _client(endpoint: DicomwebEndpoint, environ: Mapping[str, str] | None) -> Any:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = checked_credentials(endpoint.url, "DICOMweb", environ)
    return DICOMwebClient(endpoint.url, session=session, timeout=endpoint.timeout_s)


def _value(item: Mapping[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def query_series(
    endpoint: DicomwebEndpoint, query: DicomwebQuery, *, environ: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(study UID, series UID) of the series ``query`` selects (QIDO-RS), sorted.

    Raises:
        DataError: the server fails, nothing matches, or more than ``max_series`` match.

    """
    client = _client(endpoint, environ)
    with _talking_to(endpoint, "the series query (QIDO-RS)"):
        found = client.search_for_series(
            search_filters=query.search_filters(), fields=["SeriesDescription"], get_remaining=True
        )
    if query.description:
        pattern = re.compile(query.description, re.IGNORECASE)
        found = [item for item in found if pattern.search(_value(item, _DESCRIPTION))]
    series = sorted({(_value(item, _STUDY_UID), _value(item, _SERIES_UID)) for item in found})
    if not series:
        raise DataError(f"no series on {endpoint.url} matches the query; check fetch.query")
    if len(series) > query.max_series:
        raise DataError(
            f"{len(series)} series on {endpoint.url} match the query, more than "
            f"max_series={query.max_series}; narrow the query or raise max_series"
        )
    return series


def retrieve_series(
    endpoint: DicomwebEndpoint,
    series: Sequence[tuple[str, str]],
    folder: Path,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[RetrievedInstance]:
    """Retrieve each series (WADO-RS, as stored) into ``folder/<series key>/<n>.dcm``.

    Instances are written in SOP Instance UID order, so the same series gives the same files.

    Raises:
        DataError: the server fails or returns an empty series.

    """
    client = _client(endpoint, environ)
    retrieved = []
    for study_uid, series_uid in series:
        key = series_key(series_uid)
        with _talking_to(endpoint, f"retrieving series {key} (WADO-RS)"):
            datasets = client.retrieve_series(
                study_uid, series_uid, media_types=(("application/dicom", "*"),)
            )
        if not datasets:
            raise DataError(f"DICOMweb server {endpoint.url} returned no instances for series {key}")
        target = folder / key
        target.mkdir(parents=True)
        for number, dataset in enumerate(
            sorted(datasets, key=lambda item: str(item.SOPInstanceUID)), start=1
        ):
            path = target / f"{number:05d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            retrieved.append(RetrievedInstance(key, str(dataset.SOPInstanceUID), path, digest))
    return retrieved


def store_instances(
    endpoint: DicomwebEndpoint, files: Sequence[Path], *, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Store DICOM files (STOW-RS); return their SOP Instance UIDs.

    Raises:
        DataError: the server fails or reports any instance as failed.

    """
    import pydicom

    client = _client(endpoint, environ)
    datasets = [pydicom.dcmread(path) for path in files]
    with _talking_to(endpoint, "storing (STOW-RS)"):
        response = client.store_instances(datasets)
    failed = list(getattr(response, "FailedSOPSequence", []))
    if failed:
        raise DataError(
            f"DICOMweb server {endpoint.url} refused {len(failed)} of {len(datasets)} instance(s) (STOW-RS); "
            "see the PACS log"
        )
    return [str(dataset.SOPInstanceUID) for dataset in datasets]


def find_instances(
    endpoint: DicomwebEndpoint, filters: Mapping[str, str], *, environ: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """Instances matching ``filters`` (QIDO-RS), each as study/series/SOP instance UIDs."""
    client = _client(endpoint, environ)
    with _talking_to(endpoint, "the instance query (QIDO-RS)"):
        found = client.search_for_instances(search_filters=dict(filters), get_remaining=True)
    return [
        {
            "study": _value(item, _STUDY_UID),
            "series": _value(item, _SERIES_UID),
            "sop": _value(item, _SOP_UID),
        }
        for item in found
    ]
