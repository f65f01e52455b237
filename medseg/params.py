"""Base of every params model: pydantic v2, frozen, unknown keys forbidden."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Frozen params model; a misspelt key is an error carrying its field path."""

    model_config = ConfigDict(frozen=True, extra="forbid")
