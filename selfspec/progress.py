"""Progress of the long commands (tune, eval, bench): bars on a terminal, plain lines in a log or a pipe.

Rich draws nothing while a bar runs when its output is not a terminal, so a log would stay silent for
minutes; there, every phase change prints a line, and a timer thread prints the latest state every
SELFSPEC_PROGRESS_SECONDS (15 s by default) while a phase runs, since one trial or one generation can take
longer than that.
"""

import os
import threading
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from .errors import SelfspecError

PROGRESS_SECONDS_ENV = "SELFSPEC_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 15.0


def eta_seconds(elapsed: float, done: int, total: int, timeout: float | None = None) -> float:
    """Seconds left at the pace so far, no more than what is left of the phase's time budget."""
    left = elapsed / done * (total - done) if done else float("inf")
    return left if timeout is None else min(left, max(0.0, timeout - elapsed))


def progress_seconds() -> float:
    value = os.environ.get(PROGRESS_SECONDS_ENV, str(DEFAULT_PROGRESS_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise SelfspecError(f"{PROGRESS_SECONDS_ENV} must be a positive number of seconds, not {value!r}")
    return seconds


class Bars:
    """Rich bars: one per phase, with its count, its note (best so far, current prompt), ETA and elapsed time."""

    def __init__(self, console: Console, transient: bool = False):
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TextColumn("{task.fields[eta]}"),
            TimeElapsedColumn(),
        )
        self.progress = Progress(*columns, console=console, transient=transient)
        self.task: TaskID | None = None
        self.started = 0.0
        self.timeout: float | None = None

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, text: str) -> None:
        self.progress.console.print(f"[dim]- {text}[/dim]")

    def phase(self, name: str, total: int, unit: str, timeout: float | None = None, note: str = "") -> None:
        if self.task is not None:  # the phase before is over: its elapsed time stops here
            self.progress.stop_task(self.task)
        self.started, self.timeout = time.perf_counter(), timeout
        self.task = self.progress.add_task(name, total=total, note=note, eta="")

    def advance(self, done: int, note: str = "") -> None:
        total = self.progress.tasks[self.task].total
        left = eta_seconds(time.perf_counter() - self.started, done, total, self.timeout)
        self.progress.update(self.task, completed=done, note=note, eta=f"ETA {left:.0f}s")


class Lines:
    """Plain lines, flushed as printed: `[tune] search: 37/300 trials, best predicted 1.152x, ETA 180s`."""

    def __init__(self, command: str, file: TextIO, interval: float):
        self.command, self.file, self.interval = command, file, interval
        self.lock = threading.Lock()  # the timer thread and the command both print and read the state
        self.stopped = threading.Event()
        self.timer = threading.Thread(target=self._beat, name=f"{command}-progress", daemon=True)
        self.name: str | None = None  # the running phase or stage; None before the first and after the last
        self.total: int | None = None  # None: a stage, which only has an elapsed time
        self.unit, self.note, self.done, self.timeout = "", "", 0, None
        self.started = self.printed = time.perf_counter()

    def __enter__(self) -> "Lines":
        self.timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stopped.set()  # Ctrl-C included: the timer stops before the command prints what it has
        self.timer.join()
        if kind is None:
            with self.lock:
                self._end()

    def stage(self, text: str) -> None:
        self._begin(text, None, "", None, "")

    def phase(self, name: str, total: int, unit: str, timeout: float | None = None, note: str = "") -> None:
        self._begin(name, total, unit, timeout, note)

    def advance(self, done: int, note: str = "") -> None:
        with self.lock:
            self.done, self.note = done, note

    def _begin(self, name: str, total: int | None, unit: str, timeout: float | None, note: str) -> None:
        with self.lock:
            self._end()
            self.name, self.total, self.unit, self.timeout, self.note = name, total, unit, timeout, note
            self.done, self.started = 0, time.perf_counter()
            self._print(self._line(final=False))

    def _end(self) -> None:
        """The finished phase's last state: a stage's end needs no line, the next one says it."""
        if self.name is not None and self.total is not None:
            self._print(self._line(final=True))
        self.name = None

    def _beat(self) -> None:
        while not self.stopped.wait(max(0.0, self.printed + self.interval - time.perf_counter())):
            with self.lock:
                if time.perf_counter() - self.printed < self.interval:
                    continue
                if self.name is None:  # between phases: nothing to say, but the wait restarts (no spinning)
                    self.printed = time.perf_counter()
                else:
                    self._print(self._line(final=False))

    def _line(self, final: bool) -> str:
        elapsed = time.perf_counter() - self.started
        if self.total is None:
            return f"{self.name}: {elapsed:.0f}s" if elapsed >= 1 else self.name
        parts = [f"{self.name}: {self.done}/{self.total} {self.unit}"] + [self.note] * bool(self.note)
        if final:
            parts.append(f"{elapsed:.0f}s")
        elif self.done:
            parts.append(f"ETA {eta_seconds(elapsed, self.done, self.total, self.timeout):.0f}s")
        return ", ".join(parts)

    def _print(self, line: str) -> None:
        self.printed = time.perf_counter()
        self.file.write(f"[{self.command}] {line}\n")
        self.file.flush()


def progress_for(console: Console, command: str, transient: bool = False) -> Bars | Lines:
    """Bars where `console` is a terminal, else plain lines to the same stream."""
    if console.is_terminal:
        return Bars(console, transient)
    return Lines(command, console.file, progress_seconds())
