"""Progress for long loops: a live bar on a terminal, a few plain lines anywhere else.

::

    stderr is a terminal ──> tqdm bar, redrawn in place with ``\\r``
    stderr is a file/pipe ──> one line per ``every`` updates (default: ~10 a loop) and one at the end

A bar redrawn thousands of times into a log file (CI, ``nohup``, ``> run.log``) makes the log
unreadable; tqdm itself only knows "draw" or "don't draw", so the choice is made here, once.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` interface, written as whole lines.

    A line is printed after every ``every`` updates and once on ``close`` (unless the last update
    already printed it); each line carries the count, the rate and the latest postfix values.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._printed_at = self._initial = initial
        self.every = every or max(1, -(-(total or 100) // 10))  # ceil: at most ~10 lines
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._closed = False

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._printed_at >= self.every:
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._initial) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        head = f"{self.desc}: " if self.desc else ""
        print(f"{head}{count} {self.unit}s ({rate:.2f} {self.unit}/s){extra}", file=self.stream)
        self.stream.flush()
        self._printed_at = self.n

    def close(self) -> None:
        if not self._closed and self.n != self._printed_at:
            self._print()
        self._closed = True


class _NoProgress:
    """What a disabled bar is: every call does nothing."""

    n = 0

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int | None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
    stream: TextIO | None = None,
) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` elsewhere, nothing when not ``enabled``.

    Args:
        total: how many updates make the loop (None: unknown).
        desc: the label in front (``"epoch 1/3"``).
        unit: what one update counts (``"step"``, ``"row"``).
        initial: updates already done (a resumed epoch).
        enabled: False gives a bar that prints nothing (other processes than rank 0, quiet runs).
        leave: keep the finished bar on a terminal.
        stream: where to write (default ``sys.stderr``).
    """
    if not enabled:
        return _NoProgress()
    stream = stream if stream is not None else sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            leave=leave,
            file=stream,
            dynamic_ncols=True,
        )
    return LineProgress(total, desc=desc, unit=unit, initial=initial, stream=stream)


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off transformers' own bars ("Loading weights ...") unless ``stream`` is a terminal:
    they redraw with ``\r`` too, and peftkit logs what it loaded in its own words."""
    if _is_terminal(stream if stream is not None else sys.stderr):
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


__all__ = ["LineProgress", "progress_bar", "quiet_library_bars"]
