import pytest

from conftest import DEMO_YAML, TINY
from stamp_dist.cli import main


@pytest.mark.slow
def test_demo_end_to_end_then_cached(tmp_path, capsys, monkeypatch):
    """`stamp demo` at toy size: every stage runs, the table has every method, a re-run skips all."""
    paths = [f"data.root={tmp_path}/data", f"data.reference={tmp_path}/data/reference",
             f"pretrain.out={tmp_path}/pretrain", f"meta.out={tmp_path}/meta", f"bench.out={tmp_path}/results"]
    args = ["demo", "-c", str(DEMO_YAML), *TINY, *paths]
    assert main(args) == 0
    out = capsys.readouterr().out
    for stage in ("=== data", "=== pretrain", "=== meta-train", "=== prune + fine-tune"):
        assert stage in out
    table = (tmp_path / "results" / "summary.md").read_text()
    for target in ("digits", "synthetic_heldout"):
        for method in ("dense", "random", "stamp"):
            assert f"| {target} | {method} |" in table
    assert (tmp_path / "meta" / "generators" / "best.json").is_file()

    def no_work(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    # The re-run must not train anything: no pretrain/fine-tune epoch, no meta-step, no bench cell.
    monkeypatch.setattr("stamp_dist.training.train_epoch", no_work)
    monkeypatch.setattr("stamp_dist.meta.trainer.MetaTrainer.meta_step", no_work)
    monkeypatch.setattr("stamp_dist.bench.run_cell", no_work)
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert (tmp_path / "results" / "summary.md").read_text() == table
