"""Progress of long work: a bar on a terminal, plain lines (step, fields, rate, ETA) elsewhere."""

import io
import re

from fsdfm.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    with Progress(4, "fsdfm demo", stream=out, interval=0) as progress:
        progress.update()
        progress.note(loss=3.25, tokens_per_s=12345.0)
        progress.update(3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fsdfm demo: step 1/4 (25%), ")
    assert re.search(r"step 1/4 \(25%\), .* step/s, ETA \d+:\d\d:\d\d$", lines[0]), lines[0]
    assert "loss 3.25, 12,345 tokens/s" in lines[1]
    assert lines[-1].startswith("fsdfm demo: step 4/4 (100%), loss 3.25")
    assert len(lines) == 3, "closing after a line at the same count adds none"
    assert "\r" not in out.getvalue()


def test_plain_lines_are_spaced_by_the_interval():
    """Between milestones at most one line per interval; the end always has its line."""
    out = io.StringIO()
    with Progress(100, "fsdfm demo", unit="NFE", stream=out, interval=3600) as progress:
        for _ in range(100):
            progress.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsdfm demo: NFE 100/100 (100%)")


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    out = Terminal()
    with Progress(3, "fsdfm demo", stream=out, interval=0, initial=1) as progress:
        progress.update(2)
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()
    assert "step 3/3 (" not in out.getvalue(), "no plain lines under the bar"
    quiet = io.StringIO()
    with Progress(3, "fsdfm demo", stream=quiet, enabled=False) as progress:
        progress.update(3)
        progress.note(loss=1.0)
    assert quiet.getvalue() == ""


def test_tracked_yields_everything_and_ends_with_a_line(monkeypatch):
    import sys

    from fsdfm.progress import tracked

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    assert list(tracked(range(5), "fsdfm scoring", unit="batch")) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("fsdfm scoring: batch 5/5 (100%)")
    assert list(tracked([1, 2], "quiet", enabled=False)) == [1, 2]
    assert out.getvalue().count("quiet") == 0
