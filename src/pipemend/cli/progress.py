"""The CLI's ``Progress``: a rich status line (and progress bars for ``eval``) on stderr."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars
from rich.status import Status

from ..diagnose import Diagnosis
from .render import candidate_line, render_diagnosis


class RichProgress:
    """Shows a flow's progress on ``console``: ``status`` as a spinner line, ``log`` as lines (timestamped with
    ``timestamps``), ``eval_progress`` events as bars (``counts="bars"``), in the status line (``"status"``) or
    not at all (``"off"``), diagnoses as tables, announcements and warnings in yellow.
    Use it as a context manager so that the live display ends with the flow."""

    def __init__(self, console: Console, *, counts: Literal["status", "bars", "off"] = "status",
                 timestamps: bool = True):
        self.console = console
        self.counts = counts
        self.timestamps = timestamps
        self._status: Status | None = None
        self._bars: Bars | None = None
        self._tasks: dict[str, TaskID] = {}
        if counts == "bars":
            self._bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self) -> RichProgress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self._bars is not None:
            self._bars.stop()

    def status(self, text: str) -> None:
        if self.counts == "off":
            return
        if self._status is None:
            self._status = self.console.status(escape(text))
            self._status.start()
        else:
            self._status.update(escape(text))

    def log(self, text: str) -> None:
        self._line(escape(text))

    def _line(self, markup: str) -> None:
        if self.timestamps:
            self.console.log(markup)
        else:
            self.console.print(markup)

    def event(self, name: str, **fields: Any) -> None:
        if name in ("announce", "warning"):
            self.console.print(f"[yellow]{escape(str(fields.get('text', '')))}[/]")
        elif name == "eval_progress":
            self._count(str(fields["task"]), int(fields["done"]), int(fields["total"]))
        elif name == "candidate_done":
            self._line(candidate_line(**fields))
        elif name == "diagnosis":
            d = fields["diagnosis"]
            self.console.print(render_diagnosis(d if isinstance(d, Diagnosis) else Diagnosis.from_json(d)))

    def _count(self, name: str, done: int, total: int) -> None:
        if self.counts == "off":
            return
        if self._bars is None:
            self.status(f"{name}: {done}/{total}")
            return
        if name not in self._tasks:
            self._tasks[name] = self._bars.add_task(name, total=total)
        self._bars.update(self._tasks[name], completed=done, total=total)
