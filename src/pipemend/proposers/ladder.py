"""The ``ladder`` proposer: offline, deterministic, no LLM.

From the diagnosis it starts at the recommended rung (the cheapest holding a real
share of the failures, in the order prompt, retrieval, context), climbs from there,
and makes one change per candidate: first the prompt transforms that address the
rules that fired on that rung (``PromptTransform.rules``: ``bare_json`` for a parse
step that raised on the model's fenced JSON), most failures first, then the manifest's
knobs for that rung (each declared value other than the current one, written into the
knob's config file by a one-line edit that keeps comments), then its other prompt
transforms (``transforms.PROMPT_TRANSFORMS``) applied to the answer prompt. When a
rung's options are spent it climbs to the next. Before it returns None ("out of
ideas") it tries, as a last resort, the knobs and transforms of the offline rungs no
failure pointed at, whenever anything failed (runner errors and unattributed failures
included): a diagnosis can be wrong, and the gate judges every try.

The model rung comes last, and only when the diagnosis puts failures on it: its
options are the values of the manifest's ``model`` knobs (a per-step model choice),
stronger (dearer) models first (``model_choice.order_models``). When the run's
objective (``gates.objective``) is ``cost`` or ``latency`` the ladder first tries
each ``model`` knob's cheaper models, cheapest first, whatever the diagnosis says:
such a candidate is meant to be kept as a saving.

What it tried is read back from ``ctx.history`` (``meta["ladder_key"]`` of each
earlier candidate, accepted or not, or the ``[ladder: KEY]`` tag that ends each of
its rationales, for a loop that keeps only rationales), so it never repeats a change across
candidates or after a resume; it always edits the current base, which already
holds the accepted changes In a parallel round (``optimize --parallel K``) it
also skips what ``ctx.in_flight`` says its siblings are working on, so the round's K
candidates are its K next options.

Options (``get_proposer("ladder", few_shot_k=3, max_docs=5)``): see ``LadderConfig``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import partial
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

from ..configfile import ConfigFileError, config_format, get_dotted, parse_config, set_config_value
from ..errors import UsageError
from ..protocols import Proposal, ProposalContext
from . import parse_options
from .model_choice import OBJECTIVES, ModelOption, order_models
from .tools import ToolError
from .transforms import PROMPT_TRANSFORMS, PromptTransform, TransformError, check_template, is_prompt_file

OFFLINE_RUNGS = ("prompt", "retrieval", "context")
SAVING_OBJECTIVES = ("cost", "latency")
_KEY_TAG = re.compile(r"\[ladder: ([^\]\n]+)\]")


class LadderConfig(BaseModel):
    """Options of the ladder proposer."""

    model_config = ConfigDict(extra="forbid")

    few_shot_k: int = Field(3, ge=1, le=10, description="Train examples in the few-shot transform.")
    max_docs: int = Field(5, ge=1, description="Passages kept by the truncate_docs transform.")
    transforms: list[str] | None = Field(
        None, description="Names of the prompt transforms to use (default: all, in library order)."
    )


def failing_rungs(diagnosis: dict[str, Any]) -> dict[str, int] | None:
    """Failures per rung from a ``pipemend-diagnosis-1``/``-2`` dict, or None when it says nothing (the
    ``unattributed`` failures of ``-2`` are on no rung: see ``rungs_to_try``)."""
    counts = diagnosis.get("counts")
    ids = diagnosis.get("ids") or {}
    if not isinstance(counts, dict) and not isinstance(ids, dict):
        return None
    if not counts and not ids:
        return None
    out = {}
    for rung in (*OFFLINE_RUNGS, "model"):
        n = (counts or {}).get(rung)
        if not isinstance(n, (int, float)):
            n = len(ids.get(rung) or []) if isinstance(ids, dict) else 0
        out[rung] = int(n)
    return out


def rungs_to_try(diagnosis: dict[str, Any]) -> list[str]:
    """Rungs in the order to try them; [] when nothing fails.

    It starts at the diagnosis's ``recommended`` rung (the cheapest one holding at
    least ``min_share`` of the failures, DESIGN.md §5) and climbs from there; the
    cheaper rungs it stepped over because they hold only a few failures come next,
    then the offline rungs no failure pointed at, whenever anything failed at all
    (``last_resort_rungs``), so the ladder is out of ideas only once every offline
    option was tried. Without a recommendation it starts at the cheapest rung with any
    failure. The model rung (a stronger model costs more on every call) comes last, and
    only when the diagnosis puts failures on it: "still wrong after the cheaper rungs".
    """
    counts = failing_rungs(diagnosis)
    if counts is None:
        return list(OFFLINE_RUNGS)
    model = ["model"] if counts["model"] > 0 else []
    failing = [r for r in OFFLINE_RUNGS if counts[r] > 0]
    # failures the diagnosis could put on no rung (``unattributed``: retrieval could not be judged) may lie on
    # any offline rung: they add the rungs no attributed failure named, after those, and never a recommendation
    unknown = [r for r in OFFLINE_RUNGS if r not in failing] if _positive(diagnosis, "unattributed") else []
    if not failing:
        # only "model" (or unattributed) failures: the cheaper rungs may still not have been tried offline
        ordered = list(OFFLINE_RUNGS) if model or unknown else []
    else:
        start = diagnosis.get("recommended")
        if start not in OFFLINE_RUNGS or counts[start] == 0:
            start = failing[0]
        i = OFFLINE_RUNGS.index(start)
        ordered = list(OFFLINE_RUNGS[i:]) + [r for r in OFFLINE_RUNGS[:i] if r in failing or r in unknown]
    return ordered + last_resort_rungs(diagnosis, ordered) + model


def last_resort_rungs(diagnosis: dict[str, Any], ordered: list[str]) -> list[str]:
    """The offline rungs not in ``ordered`` when the diagnosis holds any failure (on a rung, unattributed, or
    a runner ``error``: an exception outside any step, a timeout, a failed model call); [] when nothing failed."""
    counts = failing_rungs(diagnosis) or {}
    failed = (any(counts.values()) or _positive(diagnosis, "errors") or _positive(diagnosis, "unattributed")
              or _positive(diagnosis, "n_failed"))
    return [r for r in OFFLINE_RUNGS if r not in ordered] if failed else []


def _positive(diagnosis: dict[str, Any], key: str) -> bool:
    """The diagnosis's count ``key`` (``errors``, ``unattributed``, ``n_failed``) is over 0, or its id list
    (``error_ids``, ``unattributed_ids``) is not empty."""
    n = diagnosis.get(key)
    ids = diagnosis.get({"errors": "error_ids", "unattributed": "unattributed_ids"}.get(key, ""))
    return (isinstance(n, int) and not isinstance(n, bool) and n > 0) or bool(ids)


def rule_counts(diagnosis: dict[str, Any], rung: str) -> Counter[str]:
    """How many failed examples each rule named on ``rung`` (from the diagnosis's per-example ``details``)."""
    details = diagnosis.get("details")
    if not isinstance(details, dict):
        return Counter()
    return Counter(str(d.get("rule")) for d in details.values() if isinstance(d, dict) and d.get("rung") == rung)


def run_objective(manifest: Any) -> str:
    """The run's ``gates.objective``: ``score`` when the manifest has none (or one this ladder does not know)."""
    objective = getattr(getattr(manifest, "gates", None), "objective", "score")
    return objective if objective in OBJECTIVES else "score"


class LadderProposer:
    name = "ladder"

    def __init__(self, **options: Any):
        self.config = parse_options(LadderConfig, options, "ladder")
        names = {t.name for t in PROMPT_TRANSFORMS}
        unknown = sorted(set(self.config.transforms or []) - names)
        if unknown:
            raise UsageError(f"ladder proposer: unknown transforms {unknown}; valid: {', '.join(sorted(names))}")
        self._tried: set[str] = set()

    # ------------------------------------------------------------------ entry point

    def propose(self, ctx: ProposalContext) -> Proposal | None:
        tried = set(self._tried)
        for entry in [*(ctx.history or []), *(ctx.in_flight or [])]:
            key = (entry.get("meta") or {}).get("ladder_key")
            if key:
                tried.add(key)
            tried.update(_KEY_TAG.findall(str(entry.get("rationale") or "")))
        counts = failing_rungs(ctx.diagnosis or {}) or {}
        for rung, saving, options in self._plan(ctx):
            for key, attempt in options:
                if key in tried:
                    continue
                self._tried.add(key)  # tried now, whether it applies or not
                try:
                    proposal = attempt()
                except (ToolError, TransformError, ConfigFileError) as e:
                    ctx.log(f"ladder: skipped {key}: {e}")
                    continue
                if proposal is None:
                    continue
                proposal.rung = rung
                proposal.meta.update({"proposer": self.name, "ladder_key": key, "rung_failures": counts.get(rung)})
                if counts.get(rung) and not saving:
                    proposal.rationale += f" (diagnosis: {counts[rung]} train failures at the {rung} rung)"
                elif not saving and rung in counts:  # the diagnosis says so (without one, nothing is said)
                    proposal.rationale += (f" (no train failure is on the {rung} rung: tried before the ladder "
                                           "declares itself out of ideas)")
                proposal.rationale += f" [ladder: {key}]"
                return proposal
        return None

    def _plan(self, ctx: ProposalContext) -> Iterator[tuple[str, bool, Iterator[tuple[str, Any]]]]:
        """(rung, is it a saving, its options) in the order to try them: under a cost or latency objective
        the cheaper models first, then the rungs the diagnosis points at."""
        objective = run_objective(ctx.manifest)
        if objective in SAVING_OBJECTIVES:
            yield "model", True, self._model_options(ctx, objective)
        for rung in rungs_to_try(ctx.diagnosis or {}):
            yield rung, False, self._options(rung, ctx)

    # ------------------------------------------------------------------ options of one rung

    def _options(self, rung: str, ctx: ProposalContext) -> Iterator[tuple[str, Any]]:
        if rung == "model":
            yield from self._model_options(ctx, "score")
            return
        wanted = self.config.transforms
        transforms = [t for t in PROMPT_TRANSFORMS if t.rung == rung and (wanted is None or t.name in wanted)]
        fired = rule_counts(ctx.diagnosis or {}, rung)
        aimed = sorted((t for t in transforms if any(fired[r] for r in t.rules)),
                       key=lambda t: -sum(fired[r] for r in t.rules))  # stable: library order on a tie
        for transform in aimed:
            yield f"transform:{transform.name}", partial(self._transform, ctx, transform)
        knobs = getattr(ctx.manifest, "knobs", {}) or {}
        for name, knob in knobs.items():
            if knob.rung != rung:
                continue
            for value in knob.values:
                yield knob_key(name, value), partial(self._set_knob, ctx, name, knob, value)
        for transform in transforms:
            if transform not in aimed:
                yield f"transform:{transform.name}", partial(self._transform, ctx, transform)

    def _model_options(self, ctx: ProposalContext, objective: str) -> Iterator[tuple[str, Any]]:
        """The ``model`` knobs' values, ordered against each step's current model for ``objective``
        (``score``: stronger first; ``cost``/``latency``: cheaper ones, cheapest first; see ``model_choice``)."""
        knobs = getattr(ctx.manifest, "knobs", {}) or {}
        default = getattr(getattr(ctx.manifest, "llm", None), "model", None)
        for name, knob in knobs.items():
            if knob.rung != "model":
                continue
            try:
                text = ctx.tools.read_file(knob.file)
                current = get_dotted(parse_config(text, config_format(knob.file)), knob.key, default=None)
            except (ToolError, ConfigFileError) as e:
                ctx.log(f"ladder: skipped model knob {name}: {e}")
                continue
            now = current if isinstance(current, str) else default  # None: the step calls the run's model
            aim = "saving" if objective in SAVING_OBJECTIVES else "score"
            for option in order_models(knob.values, now, objective):
                yield knob_key(name, option.model), partial(self._set_knob, ctx, name, knob, option.model, model=option,
                                                            why=model_reason(option, objective), aim=aim)

    def _set_knob(self, ctx: ProposalContext, name: str, knob: Any, value: Any, *,
                  model: ModelOption | None = None, why: str = "", aim: str = "score") -> Proposal | None:
        tools = ctx.tools
        fmt = config_format(knob.file)
        text = tools.read_file(knob.file)
        current = get_dotted(parse_config(text, fmt), knob.key, default=None)
        if current == value:
            return None
        tools.write_file(knob.file, set_config_value(text, fmt, knob.key, value))
        meta: dict[str, Any] = {"kind": "knob", "knob": name, "file": knob.file, "key": knob.key,
                                "value": value, "previous": current}
        if model is not None:
            meta.update(kind="model", model=model.to_json(), objective=run_objective(ctx.manifest), aim=aim)
        return Proposal(
            rationale=f"set knob {name} ({knob.file}: {knob.key}) from {current!r} to {value!r}{why}",
            meta=meta,
        )

    def answer_prompts(self, ctx: ProposalContext) -> list[str]:
        """Editable prompt files; those named for the answer step when there are any, else all."""
        tools = ctx.tools
        prompts = [p for p in tools.list_files() if is_prompt_file(p) and tools.is_writable(p)]
        answer = [p for p in prompts if "answer" in p.rsplit("/", 1)[-1].lower()]
        return answer or prompts

    def _transform(self, ctx: ProposalContext, transform: PromptTransform) -> Proposal | None:
        tools = ctx.tools
        options = {"few_shot_k": self.config.few_shot_k, "max_docs": self.config.max_docs,
                   "train_examples": ctx.train_examples}
        changes: dict[str, str] = {}
        for rel in self.answer_prompts(ctx):
            text = tools.read_file(rel)
            new = transform.apply(text, rel, options)
            if new is None or new == text:
                continue
            check_template(new, rel)
            changes[rel] = new
        if not changes:
            return None
        for rel, new in changes.items():
            tools.write_file(rel, new)
        files = sorted(changes)
        return Proposal(
            rationale=f"{transform.describe} in {', '.join(files)}",
            meta={"kind": "transform", "transform": transform.name, "files": files},
        )


def knob_key(name: str, value: Any) -> str:
    """The ladder's key for setting knob ``name`` to ``value`` (what history records as tried)."""
    return f"knob:{name}={json.dumps(value, sort_keys=True, default=str)}"


def model_reason(option: ModelOption, objective: str) -> str:
    """Why the ladder tries ``option`` under ``objective``: the text that follows the change in its rationale."""
    what = f", a model {option.describe()}"
    if objective in SAVING_OBJECTIVES:
        if option.relation == "cheaper":
            return (f"{what}: tried first because the run's objective is {objective}; it is kept as a saving only "
                    f"if its score is non-inferior and the {objective} drops by enough")
        return (f"{what}: tried because the run's objective is {objective} and the price table cannot say "
                "whether it is cheaper; it is kept as a saving only if its score is non-inferior and it saves enough")
    if option.relation == "dearer":
        return f"{what}: a stronger model for this step, because the diagnosis puts failures on the model rung"
    return f"{what}: another model for this step, because the diagnosis puts failures on the model rung"
