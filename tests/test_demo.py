import re

import pytest

from conftest import DEMO_YAML, TINY, write_fake_fashion_mnist
from stamp_dist.cli import main
from test_progress import LINE, fake_clock


@pytest.mark.slow
def test_demo_end_to_end_then_cached(tmp_path, capsys, monkeypatch):
    """`stamp demo` at toy size, its output captured (not a terminal): every stage runs with periodic
    progress lines and no bar redraws, the table has every method, the verdict and both plots are
    written and named; a re-run skips all."""
    paths = [f"data.root={tmp_path}/data", f"data.reference={tmp_path}/data/reference",
             f"pretrain.out={tmp_path}/pretrain", f"meta.out={tmp_path}/meta", f"bench.out={tmp_path}/results",
             f"data.fashion_mnist={write_fake_fashion_mnist(tmp_path / 'fashion_idx')}"]
    args = ["demo", "-c", str(DEMO_YAML), *TINY, *paths]
    with monkeypatch.context() as m:
        fake_clock(m, 11.0)  # every third reading of the progress clock is 30 s on
        assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    for stage in ("=== data", "=== pretrain", "=== meta-train", "=== prune + fine-tune"):
        assert stage in out
    assert "\r" not in out + captured.err and "0%|" not in captured.err
    described = {m["desc"] for line in captured.err.splitlines() if (m := LINE.match(line))}
    assert {"synthetic images", "pretrain", "meta-train", "fine-tune"} <= described
    table = (tmp_path / "results" / "summary.md").read_text()
    for target in ("digits", "fashion_mnist", "synthetic_heldout"):
        for method in ("dense", "random", "stamp"):
            assert f"| {target} | {method} |" in table
    verdict = out.split("verdict:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(verdict) == 3 and re.match(r"  stamp is best in \d of 3 settings", verdict[0])
    for name in ("top1_vs_cost.png", "keep_ratios.png"):
        png = tmp_path / "results" / name
        assert f"  {png}\n" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in table
    assert (tmp_path / "meta" / "generators" / "best.json").is_file()

    def no_work(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    # The re-run must not train anything: no pretrain/fine-tune epoch, no meta-step, no bench cell.
    monkeypatch.setattr("stamp_dist.training.train_epoch", no_work)
    monkeypatch.setattr("stamp_dist.meta.trainer.MetaTrainer.meta_step", no_work)
    monkeypatch.setattr("stamp_dist.bench.run.run_cell", no_work)
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert (tmp_path / "results" / "summary.md").read_text() == table


def test_absent_targets_are_left_out_with_a_note(tmp_path, capsys):
    """Without Debian's package the demo has no Fashion-MNIST target: it says so (with the install line)
    and runs on the others; with no target at all it is an error."""
    from stamp_dist.data.manifest import MANIFEST
    from stamp_dist.demo import present_targets
    from stamp_dist.errors import StampError

    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / MANIFEST).write_text("{}")
    targets = [str(tmp_path / "digits"), str(tmp_path / "fashion_mnist")]
    assert present_targets(targets) == targets[:1]
    assert "fashion_mnist is not there (install it with `apt-get install -y dataset-fashion-mnist`" in capsys.readouterr().out
    with pytest.raises(StampError, match="none of the bench targets exist"):
        present_targets([str(tmp_path / "fashion_mnist")])
