"""Base of every params model: pydantic v2, frozen, unknown keys forbidden."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IDENTIFYING = {"identifying": True}
"""``json_schema_extra`` of a field whose value identifies a patient or study (a DICOM UID)."""


OUTSIDE_CACHE_KEY = {"cache_key": False}
"""``json_schema_extra`` of a field that cannot change a stage's outputs (where it runs): logged, unkeyed."""


def identifying_field(default: Any = None, **kwargs: Any) -> Any:
    """A params field whose value is never logged as is (``loggable`` shows a digest)."""
    return Field(default, json_schema_extra=IDENTIFYING, **kwargs)


class Params(BaseModel):
    """Frozen params model; a misspelt key is an error carrying its field path."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def keyed(self) -> dict[str, Any]:
        """The params as JSON data for a cache key: every field but those marked ``OUTSIDE_CACHE_KEY``."""
        fields = type(self).model_fields.items()
        outside = {name for name, field in fields if field.json_schema_extra == OUTSIDE_CACHE_KEY}
        return self.model_dump(mode="json", exclude=outside)

    def loggable(self) -> dict[str, Any]:
        """The params as JSON data for tracking: identifying values become ``sha256:<12 hex>``."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, Params):
                data[name] = value.loggable()
            elif field.json_schema_extra == IDENTIFYING and value is not None:
                data[name] = "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:12]
        return data


def own_params(what: str, name: str, model: type[Params] | None, extra: Mapping[str, Any]) -> Params | None:
    """The keys of a section beyond its shared ones, checked by the named entry's own params model.

    A loss's or a network's section (``train.loss``, ``train.net``) names a registry entry;
    its further keys belong to that entry. Returns ``None`` for an entry without own params.

    Raises:
        ValueError: keys the entry does not take (``{what} '{name}' takes no parameter …``,
            with the ones it takes), or the entry's model refuses their values.

    """
    own = sorted(model.model_fields) if model is not None else []
    unknown = sorted(set(extra) - set(own))
    if unknown:
        takes = f"; it takes {', '.join(own)}" if own else ""
        raise ValueError(f"{what} '{name}' takes no parameter {', '.join(unknown)}{takes}")
    return model.model_validate(dict(extra)) if model is not None else None
