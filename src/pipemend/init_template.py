"""``pipemend init DIR``: a commented ``pipemend.yaml`` skeleton guessed from the folder's files."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

from .configfile import ConfigFileError, config_format, parse_config
from .errors import UsageError
from .fsutil import atomic_write_text
from .manifest import MANIFEST_NAME

DEFAULT_MODEL = "claude-haiku-4-5"
_ENTRY_NAMES = ("run", "main", "answer", "predict")
_PREFERRED_FILES = ("pipeline.py", "main.py", "app.py")
_SKIP = {".git", ".venv", "venv", "__pycache__", "node_modules", "tests", "reports"}

DATASET_BLOCK = """\
  # JSONL rows: {{"id": "q-1", "inputs": {{...}}, "expected": ..., "evidence": ["doc-id", ...]}}
  # (`evidence`, the ids of gold supporting documents, is optional).
  path: {dataset}{dataset_note}
  # Seeded shuffle into splits. Or drop `path` and `split` and give
  # `files: {{train: train.jsonl, val: val.jsonl, test: test.jsonl}}`.
  split: {{train: 0.4, val: 0.4, test: 0.2, seed: 0}}
"""

TEMPLATE = """\
# pipemend manifest: what to run, on what data, scored how, and what may change.
# Reference: README.md ("The manifest"). Unknown keys are rejected.
name: {name}
description: ""

# `module:function` importable from this folder, called once per example with
# the example's `inputs` dict; returns a string or a JSON-able dict.
entrypoint: {entrypoint}{entry_note}

dataset:
{dataset_block}
# A built-in (exact_match, f1, contains, json_match) or `file.py:function`.
metric: exact_match

# Globs the optimizer may edit. The manifest, the data and a custom metric file
# are always protected; add your own below (each glob must match a file).
editable:
{editable}
protected: {protected}{sealed}

llm:
  # Read by the pipeline from PIPEMEND_MODEL; `--model` switches a whole run,
  # e.g. to local/qwen2.5-coder-1.5b-instruct (offline).
  model: {model}

{requirements}

{knobs}
{gates_head}
  test: sign                     # sign | bootstrap: the paired test that the candidate beats its base
  confirm_runs: 2                # an example that flipped is re-run this many times on both sides
  non_inferiority_margin: 0.01   # a saving may lose at most this much score (one-sided test)
  min_saving: 0.2                # a saving must cut cost (or latency) by at least this share
  max_cost_ratio: 1.5            # an improvement may cost at most this times its base
  max_latency_ratio: 1.5         # ... and take at most this times its base's time
  # must_pass: learned           # example ids never to break: a list, a file of ids, or `learned`

runner:
  concurrency: 4
  example_timeout_s: 120
"""

REQUIREMENTS_LINE = "requirements: requirements.txt     # the pipeline's own pip dependencies, installed in the sandbox"
NO_REQUIREMENTS_LINE = "# requirements: requirements.txt   # the pipeline's own pip dependencies, installed in the sandbox"
KNOBS_EXAMPLE = """\
# knobs:                            # parameters the `ladder` proposer may search
#   top_k: {file: config.yaml, key: retrieval.top_k, rung: retrieval, values: [3, 5, 8]}
"""
GATES_LARGE = """\
# When a candidate is kept. These defaults can accept a real improvement of a few
# points on a few hundred val examples and refuse noise across a whole run.
gates:
  objective: score               # score | cost | latency: what a kept candidate must improve
  min_delta: 0.01                # smallest mean val improvement worth a branch (1 point)
  confidence: 0.9                # for the whole run: P(any kept candidate is not a true improvement) <= 10%
  max_regressions: "5%"          # confirmed regressions allowed: a count (3) or a share of val ("5%")
  racing: [0.25, 0.5, 1.0]       # shares of val at which a candidate is judged; a loser stops early"""
GATES_SMALL = """\
# When a candidate is kept. The val split has only about {n} examples, too few for the
# defaults (made for a few hundred, where they refuse noise across a whole run): this
# manifest takes a 25 % run-level risk so that a candidate fixing a quarter of the failures
# and breaking none can pass. Add examples and restore confidence 0.9, max_regressions
# "5%" and racing [0.25, 0.5, 1.0] when you can.
gates:
  objective: score               # score | cost | latency: what a kept candidate must improve
  min_delta: 0.02                # smallest mean val improvement worth a branch (2 points)
  confidence: 0.75               # for the whole run: P(any kept candidate is not a true improvement) <= 25%
  max_regressions: "10%"         # confirmed regressions allowed: a count (3) or a share of val ("10%")
  racing: [1.0]                  # too few examples to stop a loser early"""
SMALL_VAL = 100
"""Below this many val examples ``pipemend init`` writes the small-data gates."""

CONFIG_NAMES = ("config", "settings", "params")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")
RETRIEVAL_KEYS = ("top_k", "k", "topk", "n_docs", "num_docs", "max_docs", "n_results", "num_results",
                  "n_passages", "num_passages", "max_passages")


@dataclass
class KnobGuess:
    """A retrieval-size setting found in a config file: a ``knobs:`` entry for the ladder."""

    name: str
    file: str
    key: str
    value: int

    @property
    def values(self) -> list[int]:
        """The current value's double and quadruple: more evidence is what a retrieval miss needs first."""
        return [self.value * 2, self.value * 4]

    def line(self) -> str:
        return (f"  {self.name}: {{file: {json.dumps(self.file)}, key: {json.dumps(self.key)}, rung: retrieval, "
                f"values: {json.dumps(self.values)}}}   # guessed from {self.file}: now {self.value}")


@dataclass
class Guess:
    entrypoint: str | None = None
    dataset: str | None = None
    editable: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    requirements: bool = False
    knobs: list[KnobGuess] = field(default_factory=list)


def _defines(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _looks_like_rows(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and "id" in row and "inputs" in row


def guess(target_dir: Path) -> Guess:
    """Guess the entrypoint (a ``*.py`` with a ``run``-like function), the data file and editable globs."""
    g = Guess()
    pys = sorted(p for p in target_dir.glob("*.py") if not p.name.startswith(("test_", "_")) and p.name != "setup.py")
    pys.sort(key=lambda p: (p.name not in _PREFERRED_FILES, p.name))
    for name in _ENTRY_NAMES:
        hit = next((p for p in pys if name in _defines(p)), None)
        if hit is not None:
            g.entrypoint = f"{hit.stem}:{name}"
            break
    rows = [p for p in sorted(target_dir.rglob("*.jsonl")) if not (set(p.relative_to(target_dir).parts) & _SKIP)]
    hit = next((p for p in rows if _looks_like_rows(p)), None)
    if hit is not None:
        g.dataset = hit.relative_to(target_dir).as_posix()
    g.editable = [p.name for p in pys]
    for folder in ("prompts", "templates"):
        if (target_dir / folder).is_dir() and any((target_dir / folder).iterdir()):
            g.editable.append(f"{folder}/**")
    if (target_dir / "tests").is_dir() and any((target_dir / "tests").rglob("*")):
        g.protected.append("tests/**")
    g.requirements = (target_dir / "requirements.txt").is_file()
    for cfg in _config_files(target_dir):
        g.editable.append(cfg.name)
        g.knobs += _knob_guesses(cfg)
    return g


def _config_files(target_dir: Path) -> list[Path]:
    """Top-level ``config.*``/``settings.*``/``params.*`` files of a supported format (regular files only)."""
    return sorted(p for p in target_dir.iterdir()
                  if p.suffix.lower() in CONFIG_SUFFIXES and p.stem.lower() in CONFIG_NAMES
                  and p.is_file() and not p.is_symlink())


def _knob_guesses(path: Path) -> list[KnobGuess]:
    """Positive integer settings under a retrieval-size name (``top_k``, ``k``, ``max_docs``...), at any depth."""
    try:
        data = parse_config(path.read_text(encoding="utf-8"), config_format(path))
    except (OSError, UnicodeDecodeError, ConfigFileError):
        return []
    found: list[KnobGuess] = []

    def walk(node: object, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif (isinstance(key, str) and key.lower() in RETRIEVAL_KEYS and isinstance(value, int)
                  and not isinstance(value, bool) and value > 0):
                found.append(KnobGuess(dotted.replace(".", "_"), path.name, dotted, value))

    walk(data, "")
    return found


def render(target_dir: Path, *, dataset_block: str | None = None, sealed: list[str] | None = None,
           val_size: int | None = None) -> str:
    """The skeleton's text for ``target_dir`` (placeholders marked TODO where nothing could be guessed).

    ``dataset_block`` replaces the guessed ``dataset:`` entries (indented YAML lines, as ``pipemend init --from``
    writes them); ``sealed`` globs are written as the manifest's ``sealed`` list. ``val_size``, the val
    examples the dataset will have when known, picks the small-data gates below ``SMALL_VAL``. A
    ``requirements.txt`` is named, and retrieval-size settings of config files become ladder knobs.
    """
    g = guess(target_dir)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in target_dir.resolve().name) or "pipeline"
    editable = g.editable or ["pipeline.py"]
    if dataset_block is None:
        dataset_block = DATASET_BLOCK.format(
            dataset=g.dataset or "data.jsonl",
            dataset_note="" if g.dataset else "   # TODO: create it or point to your rows")
    return TEMPLATE.format(
        name=name,
        entrypoint=g.entrypoint or "pipeline:run",
        entry_note="" if g.entrypoint else "   # TODO: no *.py with a run(inputs) function found",
        dataset_block=dataset_block,
        editable="\n".join(f"  - {json.dumps(e)}" for e in editable)
        + ("" if g.editable else "   # TODO: your prompt and pipeline files"),
        protected=json.dumps(g.protected),
        sealed=f"\nsealed: {json.dumps(sealed)}   # unreadable by the pipeline: the dataset as it came" if sealed else "",
        model=DEFAULT_MODEL,
        requirements=REQUIREMENTS_LINE if g.requirements else NO_REQUIREMENTS_LINE,
        knobs=("knobs:                              # parameters the `ladder` proposer may search\n"
               + "".join(k.line() + "\n" for k in g.knobs)) if g.knobs else KNOBS_EXAMPLE,
        gates_head=GATES_SMALL.format(n=val_size) if val_size is not None and val_size < SMALL_VAL else GATES_LARGE,
    )


def manifest_path(target_dir: str | Path) -> Path:
    """``TARGET/pipemend.yaml``; refuses an existing manifest or a missing folder (``UsageError``)."""
    target_dir = Path(target_dir)
    if not target_dir.is_dir():
        raise UsageError(f"{target_dir}: no such folder (expected the folder of an existing pipeline)")
    path = target_dir / MANIFEST_NAME
    if path.exists():
        raise UsageError(f"{path}: a manifest already exists; edit it, or remove it to start over")
    return path


def write_skeleton(target_dir: str | Path) -> Path:
    """Write ``TARGET/pipemend.yaml``; refuses an existing manifest or a missing folder (``UsageError``)."""
    path = manifest_path(target_dir)
    atomic_write_text(path, render(Path(target_dir)))
    return path
