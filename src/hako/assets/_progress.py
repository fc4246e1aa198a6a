"""Build progress: a rich live bar on a terminal, a few plain lines otherwise, nothing when disabled."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Reporter:
    """Where builders report what they do. ``enabled=False`` silences everything."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self._console: Console | None = None
        if self.live:
            # Imported only for a live display: asset lookups are on `hako run`'s critical path.
            from rich.console import Console

            self._console = Console(file=self.stream)

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(message, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def counter(self, label: str, expected: int, unit: str) -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; shows done/expected ``unit`` and elapsed time.

        On a terminal this is a live bar; otherwise one line at start, at each quarter and at the end.
        """
        start = time.monotonic()
        done = 0
        if not self.enabled:
            yield lambda n: None
            return
        if self._console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(unit),
                TimeElapsedColumn(),
                console=self._console,
                transient=False,
            )
            with bar:
                task = bar.add_task(label, total=expected)

                def advance_live(n: int) -> None:
                    nonlocal done
                    done += n
                    total = bar.tasks[0].total or expected
                    bar.update(task, completed=done, total=max(total, done))

                yield advance_live
                bar.update(task, completed=done, total=done)
            return
        self.note(f"{label}: started (about {expected} {unit} expected)")
        next_mark = 1

        def advance_plain(n: int) -> None:
            nonlocal done, next_mark
            done += n
            while next_mark < 4 and done >= expected * next_mark // 4:
                self.note(
                    f"{label}: {25 * next_mark}% ({done}/{expected} {unit}, {_fmt(time.monotonic() - start)})"
                )
                next_mark += 1

        yield advance_plain
        self.note(f"{label}: done ({done} {unit}, {_fmt(time.monotonic() - start)})")
