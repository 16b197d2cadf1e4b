"""Which model to try next on a ``model`` knob: ordered by price against the step's current model.

A knob on the ``model`` rung names a config key whose values are model names (a
per-step model choice). The ladder tries them in an order that depends on the
run's objective (``gates.objective``):

- ``score``: stronger models, those dearer than the current one, in the manifest's
  order (its order of preference), then those whose price is unknown or equal. A
  cheaper model is not tried: it rarely fixes the failures that brought the ladder here.
- ``cost`` or ``latency``: cheaper models first, cheapest first (a smaller model is
  usually faster too), then those whose price is unknown in the manifest's order.
  Dearer models are left to the score phase.

Prices come from ``gateway.pricing`` (the table the gateway charges by), compared
by input plus output price per million tokens. A model the table does not know
(an unlisted ``claude-*``, ``scripted:``, ``simulated/`` or a plugin) has an
unknown price and keeps its place in the manifest's order; the local model costs 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from ..gateway.backends.local import MODEL_NAME as LOCAL_MODEL
from ..gateway.pricing import PRICES, price_of

Relation = Literal["cheaper", "dearer", "same price", "unknown price"]
OBJECTIVES = ("score", "cost", "latency")


def model_price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens, or None when the price table does not know the model."""
    if model == LOCAL_MODEL:
        return (0.0, 0.0)
    if model.startswith("claude-") and any(model.startswith(prefix) for prefix in PRICES):
        return price_of(model)
    return None


def _blended(price: tuple[float, float]) -> float:
    return price[0] + price[1]


@dataclass(frozen=True)
class ModelOption:
    """One model a ``model`` knob could switch its step to, and how it compares with the current one."""

    model: str
    relation: Relation
    price: tuple[float, float] | None
    current_price: tuple[float, float] | None

    def describe(self) -> str:
        """``cheaper ($1/$5 per Mtok in/out against $3/$15)``, or why the prices cannot be compared."""
        if self.relation == "unknown price" or self.price is None or self.current_price is None:
            return "whose price the price table cannot compare with the current model's"
        return (f"{self.relation} (${self.price[0]:g}/${self.price[1]:g} per Mtok in/out against "
                f"${self.current_price[0]:g}/${self.current_price[1]:g})")

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "relation": self.relation,
                "price": list(self.price) if self.price else None,
                "current_price": list(self.current_price) if self.current_price else None}


def compare(model: str, current: str | None) -> ModelOption:
    price = model_price(model)
    now = model_price(current) if current else None
    if price is None or now is None:
        return ModelOption(model, "unknown price", price, now)
    a, b = _blended(price), _blended(now)
    relation: Relation = "cheaper" if a < b else "dearer" if a > b else "same price"
    return ModelOption(model, relation, price, now)


def order_models(values: Sequence[object], current: str | None, objective: str) -> list[ModelOption]:
    """The knob's models worth trying against ``current``, in the order to try them (see the module doc).

    ``current`` itself, values that are not strings and repeats are left out. An unknown ``objective``
    counts as ``score``."""
    seen: set[str] = set()
    options: list[ModelOption] = []
    for value in values:
        if isinstance(value, str) and value != current and value not in seen:
            seen.add(value)
            options.append(compare(value, current))
    unknown = [o for o in options if o.relation == "unknown price"]
    if objective in ("cost", "latency"):
        cheaper = sorted((o for o in options if o.relation == "cheaper"), key=lambda o: _blended(o.price or (0, 0)))
        return cheaper + unknown
    dearer = [o for o in options if o.relation == "dearer"]
    same = [o for o in options if o.relation == "same price"]
    return dearer + unknown + same
