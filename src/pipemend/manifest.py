"""The target's manifest, ``pipemend.yaml``: what to run, on what data, scored how, editable where.

Validated by pydantic with unknown keys rejected. ``load_manifest`` turns every
problem into a ``ConfigError`` that names the file, the key and what was expected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .globs import is_relative_glob
from .judges.names import JUDGE_PREFIX, JUDGES
from .manifest_checks import check_manifest_files
from .sealing import Seal, plan_seals

MANIFEST_NAME = "pipemend.yaml"
RUNGS = ("prompt", "retrieval", "context", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitFractions(_Strict):
    """Split one dataset file into train/val/test by seeded shuffle of ids."""

    train: float = Field(ge=0, le=1, description="Fraction of rows for train (the proposer's view).")
    val: float = Field(ge=0, le=1, description="Fraction for val (the gate's view, aggregates only).")
    test: float = Field(ge=0, le=1, description="Fraction for test (scored once at the end).")
    seed: int = Field(0, description="Seed of the shuffle, so splits are stable.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions sum to {total:g}, expected train + val + test = 1")
        return self


class SplitFiles(_Strict):
    """Explicit per-split JSONL files, relative to the target folder."""

    train: str
    val: str
    test: str


SOURCE_FORMATS = ("hotpotqa", "musique", "beir", "csv", "jsonl")
SOURCE_TARGETS = ("id", "expected", "evidence", "evidence_text", "split")
"""Row fields a source's ``fields`` may fill, besides ``inputs.<name>`` (one per entrypoint keyword)."""


class DatasetSource(_Strict):
    """The dataset as it came: `pipemend init DIR --from FORMAT FILE` converted it; `--reimport` re-converts it."""

    format: Literal["hotpotqa", "musique", "beir", "csv", "jsonl"] = Field(description="The source's format.")
    file: str = Field(description="The source file (a BEIR folder), relative to the target or absolute.")
    fields: dict[str, str] = Field(min_length=1, description=(
        "Row field <- source field: `id`, `inputs.<name>`, `expected`, `evidence`, `evidence_text`, `split`."))

    @field_validator("fields")
    @classmethod
    def _row_fields(cls, v: dict[str, str]) -> dict[str, str]:
        for target in v:
            name = target.removeprefix("inputs.")
            if target not in SOURCE_TARGETS and not (target.startswith("inputs.") and name.isidentifier()):
                raise ValueError(f"{target!r} is not a row field: use id, inputs.<name>, expected, evidence, "
                                 "evidence_text or split")
        if "id" not in v or not any(t.startswith("inputs.") for t in v):
            raise ValueError("`fields` needs `id` and at least one `inputs.<name>`")
        return v


class DatasetConfig(_Strict):
    path: str | None = Field(None, description="JSONL rows {id, inputs, expected, evidence?}, relative to the target.")
    split: SplitFractions | None = Field(None, description="Fractions to split `path` into train/val/test.")
    files: SplitFiles | None = Field(None, description="Explicit per-split files instead of `path` + `split`.")
    source: DatasetSource | None = Field(None, description="Where the rows were converted from (`pipemend init --from`).")
    corpus: str | None = Field(None, description=(
        "JSONL rows {id, text} of the documents `evidence` ids name, relative to the target: the diagnosis checks "
        "whether each gold passage's text reached a model call's prompt. Frozen and sealed like the dataset, "
        "unless a `runtime` glob matches it (then the pipeline may read it)."))

    @field_validator("corpus")
    @classmethod
    def _corpus_inside(cls, v: str | None) -> str | None:
        if v is not None and (not is_relative_glob(v) or any(c in v for c in "*?[")):
            raise ValueError(f"corpus {v!r}: expected a file path relative to the target folder (no '..', no glob)")
        return v

    @model_validator(mode="after")
    def _one_way(self) -> "DatasetConfig":
        if self.files is None and (self.path is None or self.split is None):
            raise ValueError("give either `path` and `split`, or `files: {train, val, test}`")
        if self.files is not None and (self.path is not None or self.split is not None):
            raise ValueError("give either `path` and `split`, or `files`, not both")
        return self


class Knob(_Strict):
    """A named parameter a proposer may search: a key in a config file of the target."""

    file: str = Field(description="Config file (YAML, JSON or TOML) relative to the target.")
    key: str = Field(description="Dotted key path inside that file, e.g. `retrieval.top_k`.")
    rung: Literal["prompt", "retrieval", "context", "model"] = Field(description="Which ladder rung it acts on.")
    values: list[Any] = Field(min_length=1, description="Candidate values to try, in order of preference.")


class LLMConfig(_Strict):
    model: str = Field(description="Model the pipeline calls by default (PIPEMEND_MODEL overrides).")


class JudgeConfig(_Strict):
    """The model that answers the `judge:*` metrics (through the run's own judge gateway, `RUN_DIR/judge/`)."""

    model: str | None = Field(None, description=(
        "Model of the judge metrics (`judge:correctness`, `judge:faithfulness`, `judge:relevance`); default the "
        "manifest's `llm.model` (never `--model`: the judge stays fixed while the pipeline's model changes). "
        "`pipemend eval --judge-model` overrides it."))
    budget_usd: float | None = Field(None, ge=0, description=(
        "Dollars the judge's calls may spend in one run (eval or optimize, resumes included); None: no limit. "
        "Judgments the cache answers cost nothing. Apart from `--budget-usd`, which caps the pipeline's calls; "
        "when it runs out, an optimize run stops proposing and an eval scores the unjudged examples as metric errors."))


CUSTOM_METRIC_SUFFIX = ".py"


def custom_metric_file(spec: str) -> str | None:
    """The file of a `file.py:function` metric spec; None for a built-in or a judge."""
    file, sep, func = spec.partition(":")
    return file if sep and file.endswith(CUSTOM_METRIC_SUFFIX) and func else None


def check_metric_name(spec: Any, where: str) -> str:
    """One metric spec (not a weighted one): a string naming a built-in, a known judge or `file.py:function`;
    the syntax only (``manifest_checks`` checks built-in names and files). Raises ValueError naming ``where``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: {spec!r} is not a metric name; expected a built-in name, `judge:<name>` or "
                         "`file.py:function`")
    spec = spec.strip()
    if spec.startswith(JUDGE_PREFIX) and spec not in JUDGES:
        raise ValueError(f"{where}: unknown judge {spec!r}; expected one of {', '.join(JUDGES)}")
    return spec


class WeightedMetric(_Strict):
    """A composite metric: the weighted mean of other metrics' scores (weights normalized to sum to 1)."""

    weights: dict[str, float] = Field(min_length=1, description=(
        "Metric name -> positive weight, e.g. `{exact_match: 0.7, \"judge:faithfulness\": 0.3}`. Each name is a "
        "built-in, a `judge:*` or `file.py:function`; the weights are divided by their sum, so `{a: 7, b: 3}` is "
        "`{a: 0.7, b: 0.3}`. Each scored row keeps every part's score (`metric_parts`)."))

    @field_validator("weights", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise ValueError("expected a mapping of metric name -> positive weight, e.g. {exact_match: 0.7, "
                             "\"judge:faithfulness\": 0.3}")
        out: dict[str, float] = {}
        for name, w in v.items():
            spec = check_metric_name(name, f"metric.weights.{name}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"metric.weights.{name}: weight {w!r}; expected a positive number")
            if spec in out:
                raise ValueError(f"metric.weights.{name}: named twice")
            out[spec] = float(w)
        return out

    def normalized(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {k: w / total for k, w in self.weights.items()}

    def label(self) -> str:
        return " + ".join(f"{w:.2g}·{k}" for k, w in self.normalized().items())


class Gates(_Strict):
    """Acceptance rules for a candidate against its base on val (``pipemend.evidence`` applies them)."""

    min_delta: float = Field(0.01, ge=0, description="Smallest mean val improvement worth a branch.")
    max_regressions: int | str = Field("5%", description=(
        "Confirmed regressions allowed (right in the base and wrong in the candidate, each confirmed by re-runs): "
        "a count (`3`) or a share of val (`\"2%\"`)."))
    must_pass: list[str] | str = Field(default_factory=list, description=(
        "Val examples a candidate may never break: a list of ids, a target-relative file of ids (one per line, "
        "`#` comments), or `learned`: every example all accepted bases so far got right."))
    confirm_runs: int = Field(2, ge=0, le=8, description=(
        "Re-runs, on both sides, of every example that flipped between base and candidate (fresh samples for "
        "sampled calls); a flip counts only when it holds in the majority of each side's runs."))
    confidence: float = Field(0.9, gt=0, lt=1, description=(
        "Run-level: the chance that ANY kept candidate of the run is not a true improvement stays at or below "
        "1 - confidence (the error budget is split across candidates)."))
    test: Literal["sign", "bootstrap"] = Field("sign", description="Paired one-sided test on per-example deltas.")
    racing: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0], min_length=1, description=(
        "Growing shares of val a candidate is looked at; it stops paying as soon as it cannot pass. `[1.0]`: "
        "no racing."))
    objective: Literal["score", "cost", "latency"] = Field("score", description=(
        "What the run optimizes. With cost or latency a candidate may also be kept as a saving."))
    non_inferiority_margin: float = Field(0.01, ge=0, le=1, description=(
        "A saving's score may be lower than the base's by less than this (one-sided test)."))
    min_saving: float = Field(0.2, gt=0, lt=1, description="A saving cuts cost (or latency) by at least this share.")
    max_cost_ratio: float = Field(1.5, gt=0, description="Candidate cost / base cost on val.")
    max_latency_ratio: float = Field(1.5, gt=0, description="Candidate latency / base latency on val.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "repeats" in data:
            raise ValueError("`gates.repeats` was replaced by `gates.confirm_runs` (only examples that flipped "
                             "are re-run, on both sides)")
        return data

    @field_validator("max_regressions", mode="before")
    @classmethod
    def _count_or_share(cls, v: Any) -> int | str:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError("expected a count (3) or a share of val (\"2%\")")
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"max_regressions {v}: expected a count >= 0")
            return v
        text = v.strip()
        try:
            share = float(text[:-1]) if text.endswith("%") else None
        except ValueError:
            share = None
        if share is None or not 0 <= share <= 100:
            raise ValueError(f"max_regressions {v!r}: expected a count (3) or a share of val between 0% and 100% "
                             "(\"2%\")")
        return text

    @field_validator("racing")
    @classmethod
    def _growing_shares(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in v) or any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 1.0:
            raise ValueError(f"racing {v}: expected growing shares of val in (0, 1], ending with 1.0")
        return v

    @field_validator("must_pass")
    @classmethod
    def _ids_or_file(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str) and v != "learned" and not is_relative_glob(v):
            raise ValueError(f"must_pass {v!r}: expected a list of ids, `learned`, or a file relative to the target")
        return v

    def allowed_regressions(self, n: int) -> int:
        """``max_regressions`` as a count for ``n`` val examples."""
        v = self.max_regressions
        return v if isinstance(v, int) else int(float(v[:-1]) / 100.0 * n + 1e-9)


class RunnerConfig(_Strict):
    concurrency: int = Field(4, ge=1, description="Examples run at once inside the sandbox.")
    example_timeout_s: float = Field(120.0, gt=0, description="One example's time limit; past it scores 0.")


class Manifest(_Strict):
    name: str
    description: str = ""
    entrypoint: str = Field(description="`module:function`, called once per example with its `inputs` dict.")
    dataset: DatasetConfig
    metric: str | WeightedMetric = Field(description=(
        "Built-in name (exact_match, f1, contains, json_match), an LLM judge (`judge:correctness`, "
        "`judge:faithfulness`, `judge:relevance`), `file.py:function`, or `{weights: {name: weight, ...}}`: the "
        "weighted mean of such metrics (weights positive, normalized to sum to 1)."))
    editable: list[str] = Field(min_length=1, description="Globs (relative to the target) the proposer may change.")
    protected: list[str] = Field(default_factory=list, description="Globs it may never change.")
    knobs: dict[str, Knob] = Field(default_factory=dict)
    llm: LLMConfig
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge metrics' model (`judge: {model: ...}`).")
    requirements: str | None = Field(None, description="pip requirements file of the target's own dependencies.")
    gates: Gates = Field(default_factory=Gates)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    # ------------------------------------------------------------------ sealed vs run-time files (the label seal)
    sealed: list[str] = Field(default_factory=list, description=(
        "Globs of files that neither the pipeline nor any proposer may read (labels and anything they can be "
        "derived from: answer keys, a seeded generator). Sealed files are masked in the sandbox and absent from "
        "candidate worktrees. Sealed whatever this says: the dataset files and a custom metric file. Sealed by "
        "default unless matched by `runtime`: every file in the dataset's folder (when it is not the target's "
        "root), every file whose bytes name a dataset file (`questions.jsonl`: that is how a generator that "
        "writes the dataset is found; keep generators outside the target folder), a file with a dataset file's "
        "name or content, and a symlink that leaves the target. A symlink or hard link to a sealed file is "
        "sealed too. A sealed file may not be editable."))
    runtime: list[str] = Field(default_factory=list, description=(
        "Globs of protected files the pipeline reads at run time (a corpus, a model file, an index): never "
        "sealed by default. May not match a dataset file, the metric file, a `sealed` glob's files or a link to "
        "one; declare here only what cannot derive labels."))

    @field_validator("sealed", "runtime")
    @classmethod
    def _relative_globs(cls, v: list[str], info: Any) -> list[str]:
        for i, g in enumerate(v):
            if not is_relative_glob(g):
                raise ValueError(f"{info.field_name}[{i}]: glob {g!r} is empty, absolute or climbs out with '..'; "
                                 "expected a glob relative to the target folder")
        return v

    def seal_plan(self, target_dir: str | Path) -> list[Seal]:
        """Every sealed path of the target with why (``Seal.declared`` False: sealed by default, worth flagging).

        Raises ``ConfigError`` naming the manifest and the key for conflicts (see ``pipemend.sealing``).
        """
        return plan_seals(self, target_dir, manifest_name=MANIFEST_NAME)

    def sealed_paths(self, target_dir: str | Path) -> list[str]:
        """Target-relative POSIX paths (sorted) that the pipeline and proposers must never read: regular
        files, and symlinks by their own path (never followed). Compute it once from the baseline target."""
        return [s.path for s in self.seal_plan(target_dir)]

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_shape(cls, v: Any) -> Any:
        if isinstance(v, dict):
            try:
                return WeightedMetric.model_validate(v)
            except ValidationError as e:  # one clean message naming the key, not one per branch of the union
                err = e.errors()[0]
                if err.get("type") == "extra_forbidden":
                    raise ValueError(f"metric.{_loc(err)}: unknown key; expected `weights`") from None
                msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
                raise ValueError(msg if msg.startswith("metric.") else f"metric.{_loc(err)}: {msg}") from None
        return check_metric_name(v, "metric")

    def metric_specs(self) -> list[str]:
        """Every single metric the score is made of: the one name, or a weighted metric's names."""
        return list(self.metric.weights) if isinstance(self.metric, WeightedMetric) else [self.metric]

    def metric_files(self) -> list[str]:
        """Target-relative files of the custom (`file.py:function`) metrics among ``metric_specs``."""
        return list(dict.fromkeys(f for f in map(custom_metric_file, self.metric_specs()) if f))

    def judge_specs(self) -> list[str]:
        """The `judge:*` metrics the score asks (each one model call per example)."""
        return [s for s in self.metric_specs() if s.startswith(JUDGE_PREFIX)]

    def metric_label(self) -> str:
        """The metric as one line of text (a weighted one as `0.7·exact_match + 0.3·judge:faithfulness`)."""
        return self.metric.label() if isinstance(self.metric, WeightedMetric) else self.metric

    def judge_model(self, override: str | None = None) -> str:
        """The judge's model: ``override`` (`--judge-model`), else `judge.model`, else `llm.model`."""
        return override or self.judge.model or self.llm.model

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint_shape(cls, v: str) -> str:
        mod, sep, fn = v.partition(":")
        if not sep or not mod or not fn or not all(p.isidentifier() for p in mod.split(".")) or not fn.isidentifier():
            raise ValueError(f"entrypoint {v!r} is not `module:function`")
        return v

    # ------------------------------------------------------------------ helpers used across pipemend

    def always_protected(self) -> list[str]:
        """Globs protected whatever the manifest says: the manifest, the data and a custom metric file."""
        globs = [MANIFEST_NAME]
        if self.dataset.path:
            globs.append(self.dataset.path)
        if self.dataset.files:
            globs += [self.dataset.files.train, self.dataset.files.val, self.dataset.files.test]
        if self.dataset.corpus:
            globs.append(self.dataset.corpus)
        globs += self.metric_files()
        if self.requirements:
            globs.append(self.requirements)
        if isinstance(self.gates.must_pass, str) and self.gates.must_pass != "learned":
            globs.append(self.gates.must_pass)
        return globs

    def all_protected(self) -> list[str]:
        return list(dict.fromkeys(self.protected + self.always_protected()))

    def models(self, run_model: str | None = None) -> list[str]:
        """The models a run's gateway serves (its ``GatewayConfig.models`` allow-list), in order, once each:
        the run's model (``run_model``, e.g. ``--model``; default ``llm.model``), then every value of every
        knob on the ``model`` rung (a per-step model choice the pipeline reads from its config file).

        Raises ``ConfigError`` for a model-rung value that is not a non-empty string (``load_manifest``'s
        file checks refuse it earlier; a manifest loaded without them is checked here)."""
        names = [run_model or self.llm.model]
        for name, knob in self.knobs.items():
            if knob.rung != "model":
                continue
            for i, value in enumerate(knob.values):
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(MANIFEST_NAME, f"knobs.{name}.values[{i}]", f"{value!r} is not a model name",
                                      "a model name such as claude-haiku-4-5 (a `model` knob's values are models)")
                names.append(value)
        return list(dict.fromkeys(names))


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(top level)"


def load_manifest(target_dir: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate ``TARGET/pipemend.yaml``.

    Raises ``ConfigError`` naming the file, the key and what was expected.
    With ``check_files`` the cross-file checks run too (see ``manifest_checks``).
    """
    target_dir = Path(target_dir)
    path = target_dir / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(path, None, "no manifest found", f"a {MANIFEST_NAME} in {target_dir} (run `pipemend init {target_dir}`)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise ConfigError(path, where, f"not valid YAML: {getattr(e, 'problem', e)}", "a YAML mapping") from e
    if not isinstance(raw, dict):
        raise ConfigError(path, None, "the manifest is not a mapping", "keys such as name, entrypoint, dataset, metric")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        kind = first.get("type", "")
        if kind == "extra_forbidden":
            raise ConfigError(path, _loc(first), "unknown key", "one of the documented keys (see `pipemend init`)") from None
        if kind == "missing":
            raise ConfigError(path, _loc(first), "required key is missing") from None
        raise ConfigError(path, _loc(first), first.get("msg", "invalid value")) from None
    if check_files:
        check_manifest_files(manifest, target_dir, path)
    return manifest
