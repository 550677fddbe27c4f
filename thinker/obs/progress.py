"""Live progress bars and the closing summary table of the example scripts and the benchmark.

The scripts print one line per event, as they always have; rich adds, in a terminal only, a live
bar per user (steps done / total, latest loss) that vanishes when the run ends. When stdout is
not an interactive terminal (a pipe, a CI log, pytest capturing output, ``TERM=dumb``,
``TTY_INTERACTIVE=0``) the bars are off entirely, so no cursor codes or redrawn frames land in
the log, and the summary table is printed once as plain text.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Beyond this many users one bar per user no longer fits a terminal; show one bar for all.
MAX_BARS = 12


def make_console() -> Console:
    """The console every script prints its rich output to (stdout)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A log file has no width; rich's default of 80 columns would wrap the tables.
        console.width = 120
    return console


def is_live(console: Console) -> bool:
    """Whether live redrawing is welcome: an interactive console on a real terminal. FORCE_COLOR
    makes rich treat a pipe as a terminal, but a CI log still cannot take cursor movement."""
    return console.is_interactive and sys.stdout.isatty()


def step_progress(console: Console, loss: bool = True) -> Progress:
    """A transient progress display (with a ``loss`` field unless ``loss=False``); disabled off
    a terminal."""
    columns = [TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn()]
    if loss:
        columns.append(TextColumn("loss {task.fields[loss]}"))
    return Progress(
        *columns,
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not is_live(console),
    )


class UserProgress:
    """One bar per user (or one for all of them, past MAX_BARS); safe to update from threads."""

    def __init__(self, console: Console, names: Iterable[str], steps: int) -> None:
        names = list(names)
        self.progress = step_progress(console)
        if len(names) <= MAX_BARS:
            self.tasks = {name: self.progress.add_task(name, total=steps, loss="-") for name in names}
        else:
            shared = self.progress.add_task(f"{len(names)} users", total=steps * len(names), loss="-")
            self.tasks = dict.fromkeys(names, shared)

    def step(self, name: str, loss: float) -> None:
        self.progress.update(self.tasks[name], advance=1, loss=f"{loss:.4f}")

    def fail(self, name: str) -> None:
        self.progress.update(self.tasks[name], description=f"{name} ✗")

    def __enter__(self) -> UserProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()


@dataclass
class UserRun:
    """What one user's run produced; ``error`` is set when it failed."""

    name: str
    steps: int  # requested training steps
    model_id: str | None = None
    losses: list[float] = field(default_factory=list)  # one per finished step
    tokens: int = 0  # tokens trained, summed over steps
    train_start: float | None = None  # perf_counter() around the training steps
    train_end: float | None = None
    elapsed: float = 0.0  # the whole run: create, train, sample
    sample: str | None = None
    error: str | None = None

    def record_step(self, result: dict, start: float, end: float) -> None:
        """Account one finished fwdbwd (its result dict) that ran from ``start`` to ``end``."""
        self.losses.append(result["loss"])
        self.tokens += int(result.get("num_tokens") or 0)
        self.train_start = start if self.train_start is None else self.train_start
        self.train_end = end

    @property
    def train_s(self) -> float:
        return 0.0 if self.train_start is None else self.train_end - self.train_start


def _loss_cell(losses: list[float]) -> str:
    return f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "-"


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.0f}" if seconds > 0 and tokens else "-"


def summary_table(runs: list[UserRun], wall: float, title: str = "Per-user summary") -> Table:
    """Per user: steps done/requested, first -> last loss, tokens, time, training throughput;
    then a row for all users together (training throughput over the span they trained in)."""
    rows = [
        [
            r.name,
            f"{len(r.losses)}/{r.steps}",
            _loss_cell(r.losses),
            str(r.tokens),
            f"{r.elapsed:.2f}s",
            _rate(r.tokens, r.train_s),
            f"✗ {r.error}" if r.error else f"✓ {r.model_id}",
        ]
        for r in runs
    ]
    trained = [r for r in runs if r.train_start is not None]
    span = max((r.train_end for r in trained), default=0.0) - min((r.train_start for r in trained), default=0.0)
    tokens = sum(r.tokens for r in runs)
    total = [
        "all",
        f"{sum(len(r.losses) for r in runs)}/{sum(r.steps for r in runs)}",
        "",
        str(tokens),
        f"{wall:.2f}s",
        _rate(tokens, span),
        f"{sum(not r.error for r in runs)}/{len(runs)} ok",
    ]
    headers = ["User", "Steps", "Loss first → last", "Tokens", "Time", "Train tok/s", "Adapter"]
    return make_table(title, headers, rows, justify="lrrrrrl", total=total)


def make_table(
    title: str,
    headers: list[str],
    rows: list[list[str]],
    justify: str,
    total: list[str] | None = None,
    compact: bool = False,
) -> Table:
    """A rich table of strings; ``justify``: "l" or "r" per column; ``total``: a last row, set
    apart by a rule; ``compact``: no borders or padding, only a rule under the headers (for wide
    numeric tables, so they fit 80 columns). On a console too narrow for it, cells fold onto
    more lines (no digit is cut off)."""
    style = {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": 0} if compact else {}
    table = Table(title=title, title_justify="left", **style)
    for header, side in zip(headers, justify, strict=True):
        table.add_column(header, justify="right" if side == "r" else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    if total:
        table.add_section()
        table.add_row(*total)
    return table


class Sections:
    """Numbered, timed sections of a walkthrough. Each prints its ``N. title`` header, advances a
    live bar (in a terminal), and becomes a row of the summary table: number, call, outcome, time."""

    def __init__(self, console: Console, total: int) -> None:
        self.progress = step_progress(console)
        self.task = self.progress.add_task("walkthrough", total=total, loss="-")
        self.rows: list[list[str]] = []  # [number, title, outcome, time]
        self._start = 0.0

    def start(self, title: str, call: str | None = None) -> None:
        """Close the running section and open the next one; ``call``: a shorter title for the table."""
        self._close()
        self.rows.append([str(len(self.rows) + 1), call or title, "✓", ""])
        print(f"\n{len(self.rows)}. {title}")
        self._start = time.perf_counter()

    def note(self, outcome: str, loss: float | None = None, ok: bool = True) -> None:
        """What the running section found; ``loss`` also goes to the live bar."""
        self.rows[-1][2] = f"{'✓' if ok else '✗'} {outcome}"
        if loss is not None:
            self.progress.update(self.task, loss=f"{loss:.4f}")

    def fail(self, error: str) -> None:
        """The running section raised ``error``; the walkthrough stops here."""
        if self.rows:
            self.note(error, ok=False)
        self._close()

    def _close(self) -> None:
        if self.rows and not self.rows[-1][3]:
            self.rows[-1][3] = f"{(time.perf_counter() - self._start) * 1000:.0f} ms"
            self.progress.advance(self.task)

    def table(self, title: str = "Walkthrough summary") -> Table:
        self._close()
        return make_table(title, ["#", "Call", "Outcome", "Time"], self.rows, justify="rllr")

    def __enter__(self) -> Sections:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()
