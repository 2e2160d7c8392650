"""The pydantic base of every wire type."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """A JSON body on the wire.

    Unknown fields are ignored in both directions: newer SDKs add request fields, newer servers add
    response fields, and neither may break the other (a peer that forbade extras broke on SDK 0.38).
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The body as sent: None-valued fields are omitted, defaults are kept."""
        return self.model_dump(mode="json", exclude_none=True)
