"""Dataset rows, splits and the frozen copy of data and metric a run scores with.

OWNER: the manifest/dataset/evaluate helper fills in loading and freezing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SPLITS = ("train", "val", "test")


class Example(BaseModel):
    """One dataset row. ``expected`` and ``evidence`` are labels: they stay on the host."""

    model_config = ConfigDict(extra="forbid")

    id: str
    inputs: dict[str, Any]
    expected: Any = None
    evidence: list[str] | None = Field(None, description="Ids of gold supporting documents, if known.")
    split: str | None = None

    def sealed(self) -> dict[str, Any]:
        """What may cross into a sandbox: id and inputs only."""
        return {"id": self.id, "inputs": self.inputs}
