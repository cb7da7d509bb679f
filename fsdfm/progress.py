"""Progress of long work (training, evaluation sweeps, long sampling runs) on stderr.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (a log file, CI, a pipe), where a
bar's carriage returns would make one unreadable line, plain lines instead, one per milestone
(:meth:`Progress.note`, e.g. a logged training step) and otherwise at most one every
``interval`` seconds, plus one at the end:

    fsdfm pretrain: step 120/1000 (12%), loss 3.2107, 1,234 tokens/s, 2.094 step/s, ETA 0:07:01
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


class Progress:
    """``total`` units of work (``unit``: "step", "NFE", ...), ``initial`` of them done
    before (a resumed run). ``enabled=False`` shows nothing (e.g. ranks other than 0)."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "step",
        initial: int = 0,
        enabled: bool = True,
        interval: float = 10.0,
        stream=None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.start_n = initial, initial
        self.interval = interval
        self.fields: dict[str, str] = {}
        self.started = self.last = time.monotonic()
        terminal = enabled and _is_terminal(self.stream)
        self.plain = enabled and not terminal
        self.bar = None
        if terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                dynamic_ncols=True,
            )  # fmt: skip
        self.closed = False
        self.last_n: int | None = None  # the count at the last plain line

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and time.monotonic() - self.last >= self.interval:
            self._line()

    def note(self, **fields) -> None:
        """A milestone: its fields (already formatted, or numbers) join the bar's postfix, or
        make a plain line now."""
        self.fields = {k: _format(v) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.fields, refresh=True)
        elif self.plain:
            self._line()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.plain and self.last_n != self.n:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> None:
        now = time.monotonic()
        done = self.n - self.start_n
        elapsed = now - self.started
        parts = [f"{self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        parts += [
            f"{v} {k.removesuffix('_per_s')}/s" if k.endswith("_per_s") else f"{k} {v}"
            for k, v in self.fields.items()
        ]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            left = (self.total - self.n) / rate
            parts.append(f"{_format(rate)} {self.unit}/s")
            parts.append(f"ETA {timedelta(seconds=round(left))}")
        print(f"{self.desc}: {', '.join(parts)}", file=self.stream, flush=True)
        self.last, self.last_n = now, self.n


def tracked(items, desc: str, *, total: int | None = None, unit: str = "item",
            enabled: bool = True):  # fmt: skip
    """Yield ``items``, showing their progress (:class:`Progress`; ``total`` defaults to
    ``len(items)``)."""
    with Progress(len(items) if total is None else total, desc, unit=unit,
                  enabled=enabled) as progress:  # fmt: skip
        for item in items:
            yield item
            progress.update()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
