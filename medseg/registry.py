"""Named extension points: a ``Registry`` maps a name a workflow may write to what it builds.

medseg's own entries are registered where they are defined (``training.losses``,
``training.optim``, ``io.layouts``, ``nets.unet``, ``stages``); a new loss, optimiser, layout,
network or stage is one entry in one of those files — or in an installed package that declares
it under the registry's entry-point group (``medseg.losses``, ``medseg.optimizers``,
``medseg.layouts``, ``medseg.nets``, ``medseg.stages``; the entry point's name is the name
workflows write). Plugins are loaded on the first lookup, so importing medseg stays cheap and a
broken plugin is reported (one line, logger ``medseg.plugins``) without breaking anything that
does not name it. Registries hold no torch objects, only builders, so that validating a workflow
never imports torch.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

T = TypeVar("T")

LOG = logging.getLogger("medseg.plugins")


@dataclass(frozen=True)
class Origin:
    """Where a plugin entry comes from: its entry-point group, name and installed distribution."""

    group: str
    name: str
    package: str
    version: str

    def __str__(self) -> str:
        """``package version (group:name)``."""
        return f"{self.package} {self.version} ({self.group}:{self.name})"


@dataclass(frozen=True)
class Broken:
    """A plugin entry that failed to load, with a one-line reason."""

    origin: Origin
    reason: str


_REGISTRIES: list[Registry[Any]] = []


class Registry(Mapping[str, T]):
    """Entries by name; looking up an unknown name says which names exist.

    Args:
        what: what the entries are, for messages (``loss``, ``optimiser``, ``layout``).
        group: the entry-point group installed packages extend it through (``None``: closed).
        adapt: ``adapt(name, loaded)`` turns the object the entry point ``name`` loads into an
            entry; raises ``TypeError`` saying what was expected when it is not one (default:
            taken as is).

    """

    def __init__(
        self, what: str, *, group: str | None = None, adapt: Callable[[str, Any], T] | None = None
    ) -> None:
        self.what = what
        self.group = group
        self._adapt = adapt
        self._entries: dict[str, T] = {}
        self._origins: dict[str, Origin] = {}
        self._broken: dict[str, Broken] = {}
        self._plugins_loaded = group is None
        _REGISTRIES.append(self)

    def register(self, name: str, entry: T, *, origin: Origin | None = None) -> T:
        """Add ``entry`` under ``name`` and return it (``origin``: the plugin it comes from).

        Raises:
            ValueError: ``name`` is taken (an extension may not replace an entry silently).

        """
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is already registered")
        self._entries[name] = entry
        if origin is not None:
            self._origins[name] = origin
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for extensions that are unloaded, and tests)."""
        del self._entries[name]
        self._origins.pop(name, None)

    def lookup(self, name: str) -> T:
        """The entry ``name``.

        Raises:
            ValueError: no such entry (the message lists the closest or all names), or the
                plugin that provides it failed to load (the message says why).

        """
        self.load_plugins()
        if name in self._entries:
            return self._entries[name]
        if name in self._broken:
            broken = self._broken[name]
            raise ValueError(
                f"{self.what} '{name}' comes from plugin {broken.origin}, "
                f"which failed to load: {broken.reason}"
            )
        raise ValueError(f"unknown {self.what} '{name}'{self.suggest(name)}")

    def suggest(self, name: str) -> str:
        """``; did you mean 'x'?`` or the list of valid names."""
        self.load_plugins()
        match = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        if match:
            return f"; did you mean '{match[0]}'?"
        return f"; valid: {', '.join(sorted(self._entries))}"

    def origin(self, name: str) -> Origin | None:
        """The plugin ``name`` comes from, ``None`` for medseg's own entries."""
        self.load_plugins()
        return self._origins.get(name)

    def broken(self) -> list[Broken]:
        """The plugin entries of this registry's group that failed to load."""
        self.load_plugins()
        return list(self._broken.values())

    def load_plugins(self) -> None:
        """Register the entries installed packages declare under ``group`` (once).

        A plugin whose entry point fails to import, is not the kind of object this registry
        holds, or takes a name already registered is recorded as broken and logged in one line.
        """
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for point in sorted(metadata.entry_points(group=self.group or ""), key=lambda point: point.name):
            package = point.dist.name if point.dist else "?"
            version = point.dist.version if point.dist else "?"
            origin = Origin(self.group or "", point.name, package, version)
            try:
                loaded = point.load()
                self.register(
                    point.name, self._adapt(point.name, loaded) if self._adapt else loaded, origin=origin
                )
            except Exception as error:  # any failure of third-party code is reported, not raised
                reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
                self._broken[point.name] = Broken(origin, reason)
                LOG.warning("plugin %s failed to load and is skipped: %s", origin, reason)

    def __getitem__(self, name: str) -> T:
        """The entry ``name`` (``KeyError`` when absent; ``lookup`` explains instead)."""
        self.load_plugins()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, medseg's own first, in registration order."""
        self.load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        """How many entries are registered."""
        self.load_plugins()
        return len(self._entries)


def callable_entry(name: str, loaded: Any) -> Any:
    """Adapter for registries of functions: the loaded object must be callable."""
    if not callable(loaded):
        raise TypeError(f"expected a function, got {type(loaded).__name__}")
    return loaded


def instance_of(kind: type[T]) -> Callable[[str, Any], T]:
    """Adapter for registries of ``kind`` objects: the loaded object must be one."""

    def adapt(name: str, loaded: Any) -> T:
        if not isinstance(loaded, kind):
            raise TypeError(f"expected a {kind.__name__}, got {type(loaded).__name__}")
        return loaded

    return adapt


def registries() -> list[Registry[Any]]:
    """Every registry created so far (those of the modules imported)."""
    return list(_REGISTRIES)


def plugin_versions(names: Iterable[str]) -> dict[str, str]:
    """``{"plugin:<package>": version}`` of the plugins that provide any of ``names``.

    A stage's cache key includes these, so upgrading a plugin reruns exactly the stages that
    use one of its entries (a name is matched in every registry; a coincidental match only
    costs a rerun).
    """
    wanted = set(names)
    found: dict[str, str] = {}
    for registry in _REGISTRIES:
        for name in wanted & set(registry):
            origin = registry.origin(name)
            if origin is not None:
                found[f"plugin:{origin.package}"] = origin.version
    return found
