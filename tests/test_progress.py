"""Progress output: a bar on a terminal, periodic plain lines (rate, ETA) in a log — no redraws."""

import io
import itertools
import re
import time

import numpy as np
from tqdm import tqdm

from stamp_dist import progress as progress_module
from stamp_dist.cli import main
from stamp_dist.progress import LogProgress, progress

LINE = re.compile(r"^(?P<desc>[^:]+): (done, )?[\d.]+k?/[\d.]+k? \w+ \(\d+%\), [\d.]+k? \w+/s, elapsed [\d:]+")


def fake_clock(monkeypatch, step: float) -> None:
    """Every reading of the progress clock advances it by ``step`` seconds (no sleeping)."""
    ticks = itertools.count(0.0, step)
    monkeypatch.setattr(LogProgress, "clock", staticmethod(lambda: next(ticks)))


def test_log_lines_every_interval_with_rate_eta_and_a_last_line(monkeypatch):
    fake_clock(monkeypatch, 1.0)  # one update per second
    out = io.StringIO()
    with LogProgress(total=100, desc="meta-train", unit="step", file=out) as bar:
        for _ in range(100):
            bar.update()
            bar.set_postfix({"loss": "0.500"}, refresh=False)
        bar.write("step 100: val_acc 0.800")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "meta-train: 30/100 step (30%), 1 step/s, elapsed 00:30, ETA 01:10, loss=0.500",
        "meta-train: 60/100 step (60%), 1 step/s, elapsed 01:00, ETA 00:40, loss=0.500",
        "meta-train: 90/100 step (90%), 1 step/s, elapsed 01:30, ETA 00:10, loss=0.500",
        "step 100: val_acc 0.800",
        "meta-train: done, 100/100 step (100%), 0.99 step/s, elapsed 01:41, loss=0.500",
    ]


def test_short_work_prints_nothing_and_resumed_work_counts_its_own_rate(monkeypatch):
    fake_clock(monkeypatch, 1.0)
    out = io.StringIO()
    with LogProgress(total=10, desc="fine-tune", unit="img", file=out) as bar:
        for _ in range(10):
            bar.update()
    assert out.getvalue() == ""  # 11 s of work: the caller's result line is enough

    out = io.StringIO()
    with LogProgress(total=64000, initial=32000, desc="pretrain", unit="img", unit_scale=True, file=out) as bar:
        for _ in range(31):
            bar.update(100)
    first = out.getvalue().splitlines()[0]
    assert first == "pretrain: 35.0k/64.0k img (55%), 100 img/s, elapsed 00:30, ETA 04:50"


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress(total=3, desc="x")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(progress(total=3, desc="x"), LogProgress)


def test_convert_to_a_log_has_periodic_lines_and_no_redraws(tmp_path, capsys, monkeypatch):
    """`stamp data convert` with stderr captured (not a terminal), a fake clock at 31 s per reading."""
    fake_clock(monkeypatch, 31.0)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), y=np.arange(12) % 3)
    capsys.readouterr()
    assert main(["data", "convert", "--from", "numpy", str(tmp_path / "d.npz"), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    lines = [m for line in captured.err.splitlines() if (m := LINE.match(line))]
    assert len(lines) == 13 and all(m["desc"] == "converting d.npz" for m in lines)  # every update + the last
    assert "ETA" in captured.err and captured.err.splitlines()[-1].startswith("converting d.npz: done, 12/12 img")


def test_the_module_keeps_one_interval(monkeypatch):
    """The default interval is the 30 s the logs promise."""
    assert progress_module.LOG_INTERVAL_S == 30.0
    fake_clock(monkeypatch, 29.0)
    out = io.StringIO()
    bar = LogProgress(total=5, desc="x", file=out)
    bar.update()
    assert out.getvalue() == ""
    bar.update()
    assert out.getvalue().startswith("x: 2/5 it (40%)")


def test_the_heartbeat_writes_due_lines_while_no_update_comes_and_stops_at_close(monkeypatch):
    """A held-out evaluation between epochs makes no update: the heartbeat thread still writes the line
    that is due (the fake clock is 31 s on at every reading; the heartbeat wakes every 10 ms)."""
    fake_clock(monkeypatch, 31.0)
    out = io.StringIO()
    bar = LogProgress(total=5, desc="pretrain", unit="img", file=out, heartbeat=0.01)
    deadline = time.monotonic() + 10
    while out.getvalue().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.getvalue().startswith("pretrain: 0/5 img (0%), 0 img/s, elapsed 00:31, ETA ?\n")
    bar.close()
    closed = out.getvalue()
    assert closed.splitlines()[-1].startswith("pretrain: done, 0/5 img")
    bar._thread.join(timeout=5)
    assert not bar._thread.is_alive()  # the heartbeat ends with the bar
    bar.update()  # (tqdm takes updates after close too)
    assert out.getvalue() == closed  # nothing after close
