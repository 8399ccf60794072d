import os
import socket
import subprocess
import sys

import pytest
import torch

from stamp_dist import atomic
from stamp_dist.checkpoint import load_state, save_state
from stamp_dist.errors import StampError


def _killed_between_renames(monkeypatch, out):
    """os.replace that dies (like SIGKILL would) when the new ``out`` is about to be renamed into
    place, after the old one was moved away."""
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(out) and os.path.basename(src).startswith(f".{out.name}.tmp-"):
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


def test_checkpoint_survives_a_save_killed_between_the_renames(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoint"
    save_state(ckpt, {"step": 1, "w": torch.ones(3)})
    with monkeypatch.context() as m:
        _killed_between_renames(m, ckpt)
        with pytest.raises(KeyboardInterrupt):
            save_state(ckpt, {"step": 2, "w": torch.zeros(3)})
    assert not ckpt.exists()  # the kill left only the previous version, under its backup name
    state = load_state(ckpt)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    save_state(ckpt, {"step": 2, "w": torch.zeros(3)})
    assert load_state(ckpt)["step"] == 2
    assert not any(p.name.endswith(".previous") for p in tmp_path.iterdir())  # the backup is gone again


def test_failed_block_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("failed mid-write")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(StampError, match="already exists"):
        with atomic.atomic_dir(out):
            pass


def test_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    out = tmp_path / "checkpoint"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    orphan = tmp_path / f".checkpoint.tmp-{host}-{dead}-0123abcd"
    running = tmp_path / f".checkpoint.tmp-{host}-{os.getppid()}-0123abcd"  # a live writer
    elsewhere = tmp_path / f".checkpoint.tmp-another-host-{dead}-0123abcd"  # cannot be checked from here
    for d in (orphan, running, elsewhere):
        d.mkdir()
        (d / "state.json").write_text("{}")
    save_state(out, {"step": 1})
    assert not orphan.exists() and running.exists() and elsewhere.exists()
    assert load_state(out)["step"] == 1


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_leftovers_of_killed_writers_go_at_the_next_write_beside_them(tmp_path):
    """Defect 12 of issue 15: a ``.latest.json.tmp-*`` left by a kill was never removed, and a killed
    conversion's temporary dataset stayed until an output of the same name was written again."""
    host, dead = socket.gethostname(), _dead_pid()
    pointer = tmp_path / f".latest.json.tmp-{host}-{dead}-0123abcd"
    pointer.write_text('{"version": "v0')
    dataset = tmp_path / f".digits.tmp-{host}-{dead}-89abcdef"
    (dataset / "train").mkdir(parents=True)
    atomic.write_json(tmp_path / "best.json", {"version": "v000001"})  # any other output in the same directory
    assert not pointer.exists() and not dataset.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]


def test_write_probe_refuses_a_file_in_the_way_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StampError, match="is a file"):
        atomic.check_writable(tmp_path / "file" / "sub" / "out")
    with pytest.raises(StampError, match="already exists"):
        atomic.check_writable(tmp_path / "file")
    atomic.check_writable(tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe created nothing that stays
