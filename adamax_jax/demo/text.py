"""Plain-text output for the demo: a small progress bar and an aligned table.

Only the standard library: the demo must run with nothing beyond the ``examples`` extra.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO


class ProgressBar:
    """A one-line text progress bar, redrawn in place on a terminal.

    On a terminal the bar is redrawn with a carriage return at most ``fps`` times a
    second; elsewhere (a CI log, a pipe) it prints one line when it finishes, so logs
    stay short.

    Args:
      total: Number of steps that make the bar full.
      label: Text shown before the bar.
      width: Number of characters in the bar itself.
      stream: Where to write; standard error by default, so tables on standard
        output stay clean.
      fps: Most redraws per second on a terminal.

    Example:
      >>> import io
      >>> out = io.StringIO()
      >>> bar = ProgressBar(4, "train", width=8, stream=out)
      >>> for _ in range(4):
      ...     bar.update()
      >>> bar.close()
      >>> print(out.getvalue().strip().split("  ")[0])
      train [########] 4/4
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        width: int = 30,
        stream: TextIO | None = None,
        fps: float = 10.0,
    ) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.width = width
        self.stream = sys.stderr if stream is None else stream
        self.count = 0
        self._interval = 1.0 / fps
        self._start = time.perf_counter()
        self._last_draw = -float("inf")
        self._live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._closed = False

    def _line(self) -> str:
        filled = self.width * self.count // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        return f"{self.label} [{bar}] {self.count}/{self.total}  {elapsed:5.1f}s"

    def update(self, n: int = 1) -> None:
        """Advances the bar by ``n`` steps."""
        self.count = min(self.count + n, self.total)
        now = time.perf_counter()
        if self._live and (now - self._last_draw >= self._interval or self.count == self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        """Draws the final state and ends the line."""
        if self._closed:
            return
        self._closed = True
        self.stream.write(("\r" if self._live else "") + self._line() + "\n")
        self.stream.flush()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Formats ``rows`` under ``headers`` as a Markdown-style aligned text table.

    Cells are shown with ``str`` (format floats before passing them); a column whose
    cells all read as numbers is right-aligned, any other left-aligned.

    Args:
      headers: Column titles.
      rows: One sequence of cells per row, as long as ``headers``.

    Returns:
      The table as one string, without a trailing newline.

    Example:
      >>> print(format_table(["name", "n"], [["a", 1], ["bcd", 22]]))
      | name |  n |
      |------|----|
      | a    |  1 |
      | bcd  | 22 |
    """
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(headers)}")
    numeric = [
        bool(cells) and all(_is_number(row[j]) for row in cells) for j in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[j]) for row in cells]) for j, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(list(headers)), rule, *(fmt(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
