"""The judges' prompts: Jinja2 templates inside pipemend, frozen with each run that uses them.

``templates/<name>.md.j2`` is the user message of judge ``judge:<name>``. A run copies the templates its
metric names into ``RUN_DIR/frozen/judges/`` when it freezes the target (their sha256 joins the frozen
files, which ``FrozenTarget.open`` checks), and its judges read only that copy, so upgrading pipemend in the
middle of a night's run never changes the run's judge. The values put into a prompt (the question, the
answers, the context) are the pipeline's and the dataset's: they are rendered as text, never as templates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, TemplateError

from ..errors import ConfigError
from .names import JUDGES, judge_name

TEMPLATES_DIR = Path(__file__).parent / "templates"
FROZEN_SUBDIR = "judges"
"""Where a run keeps its judges' templates, inside ``RUN_DIR/frozen/``."""
MAX_FIELD_CHARS = 24_000
"""One rendered value (question, answer, context); a longer one keeps its end (the answering call's prompt is
last) and says how much was cut."""

_OUR_TAGS = re.compile(r"<(/?)\s*(question|reference_answers|system_answer|context)\s*>", re.IGNORECASE)
"""The tags the templates put around data: a value that writes one is defanged, so an answer cannot close its
own tag and speak as the prompt."""

_ENV = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def template_file(spec: str) -> str:
    """``judge:correctness`` -> ``correctness.md.j2``."""
    return f"{judge_name(spec)}.md.j2"


def frozen_template_paths(specs: list[str]) -> list[str]:
    """The frozen-dir-relative paths of these judges' templates (``judges/<name>.md.j2``)."""
    return [f"{FROZEN_SUBDIR}/{template_file(s)}" for s in specs if s in JUDGES]


def packaged_template(spec: str) -> Path:
    """pipemend's own template of ``spec`` (what a run freezes)."""
    return TEMPLATES_DIR / template_file(spec)


def read_template(spec: str, templates_dir: Path | None) -> str:
    """The template text of ``spec``: from ``templates_dir`` (a run's frozen copy), else pipemend's own."""
    path = (Path(templates_dir) / template_file(spec)) if templates_dir is not None else packaged_template(spec)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, "metric", f"cannot read the prompt of {spec} ({e.strerror})",
                          "the judge's template, frozen with the run") from None


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` of at most about ``limit`` characters: its end, after a note of what was cut."""
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]


def as_text(value: Any) -> str:
    """A value as the judge reads it: a string as is, a dict's ``answer`` when it has one, else JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("answer"), str):
        return value["answer"]
    return json.dumps(value, ensure_ascii=False, default=str)


def inputs_text(inputs: Any) -> str:
    """An example's inputs as the question: the one value, or ``name: value`` lines."""
    if isinstance(inputs, dict) and len(inputs) == 1:
        return as_text(next(iter(inputs.values())))
    if isinstance(inputs, dict):
        return "\n".join(f"{k}: {as_text(v)}" for k, v in inputs.items())
    return as_text(inputs)


def defang(text: str) -> str:
    """``text`` with the templates' own data tags written as ``[question]``, ``[/system_answer]``, ..."""
    return _OUR_TAGS.sub(lambda m: f"[{m.group(1)}{m.group(2)}]", text)


def render(template: str, spec: str, **fields: Any) -> str:
    """The judge's prompt: ``template`` rendered with ``fields`` (each text clipped, its data tags defanged); a
    broken template is a ``ConfigError`` naming the judge."""
    values = {k: ([defang(clip(as_text(x))) for x in v] if isinstance(v, list) else defang(clip(as_text(v))))
              for k, v in fields.items()}
    try:
        return _ENV.from_string(template).render(**values)
    except TemplateError as e:
        raise ConfigError(template_file(spec), "metric", f"the prompt of {spec} does not render ({e})",
                          "a Jinja2 template using question, expected, output, context") from None
