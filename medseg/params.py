"""Base of every params model: pydantic v2, frozen, unknown keys forbidden."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IDENTIFYING = {"identifying": True}
"""``json_schema_extra`` of a field whose value identifies a patient or study (a DICOM UID)."""


def identifying_field(default: Any = None, **kwargs: Any) -> Any:
    """A params field whose value is never logged as is (``loggable`` shows a digest)."""
    return Field(default, json_schema_extra=IDENTIFYING, **kwargs)


class Params(BaseModel):
    """Frozen params model; a misspelt key is an error carrying its field path."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
