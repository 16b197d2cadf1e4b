"""pipemend: optimize a whole LLM pipeline, one reviewable git branch per accepted change."""

__version__ = "0.1.0"
