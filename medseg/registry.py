"""Named extension points: a ``Registry`` maps a name a workflow may write to what it builds.

medseg's own entries are registered where they are defined (``training.losses``,
``training.optim``, ``io.layouts``, ``stages``); a new loss, optimiser or layout is one entry
in one of those files. Registries hold no torch objects, only builders, so that validating a
workflow never imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; looking up an unknown name says which names exist.

    Args:
        what: what the entries are, for messages (``loss``, ``optimiser``, ``layout``).

    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is taken (an extension may not replace an entry silently).

        """
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for extensions that are unloaded, and tests)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        """The entry ``name``.

        Raises:
            ValueError: no such entry; the message lists the closest or all names.

        """
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} '{name}'{self.suggest(name)}")
        return self._entries[name]

    def suggest(self, name: str) -> str:
        """``; did you mean 'x'?`` or the list of valid names."""
        match = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        if match:
            return f"; did you mean '{match[0]}'?"
        return f"; valid: {', '.join(sorted(self._entries))}"

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, in registration order."""
        return iter(self._entries)
