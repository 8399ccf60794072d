"""Every bad input of issue 15 (defects 5, 7, 8, 9, 10, 12), through the `stamp` command as a user types it:
exit 2, one ``error:`` line naming the problem, no traceback, and nothing written or left behind.

Each case builds its input in a fresh directory (``make``), runs the command in-process, and compares
every file under the test's directory (paths and contents) before and after.
"""

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from stamp_dist.cli import main
from stamp_dist.meta.artifact import resolve

TINY = ["runtime.device=cpu", "prune.samples_per_class=5"]


@pytest.fixture(scope="module")
def pruned(tiny_generator, tiny_run, tmp_path_factory) -> Path:
    """A pruned model for the digits target (what `stamp finetune` cases start from)."""
    out = tmp_path_factory.mktemp("user_errors") / "pruned"
    assert main(["prune", "--generator", str(tiny_generator), "--data", str(tiny_run / "data/targets/digits"),
                 "--out", str(out), "--budget", "0.5", *TINY]) == 0
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def npz_claiming(path: Path, shape) -> None:
    """An .npz whose x.npy header claims ``shape`` but holds 16 bytes."""
    with zipfile.ZipFile(path, "w") as z:
        for name, sh, dtype in (("x.npy", shape, np.uint8), ("y.npy", (2,), np.int64)):
            b = io.BytesIO()
            np.lib.format.write_array_header_1_0(b, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": sh})
            b.write(b"\0" * 16)
            z.writestr(name, b.getvalue())


def tar_with_label(path: Path, label: bytes) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, cls in enumerate([b"0", label]):
            png = io.BytesIO()
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
            for ext, data in (("png", png.getvalue()), ("cls", cls)):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class Env:
    """What a case can use: the tiny run, its generator, a pruned model, and a scratch directory."""

    def __init__(self, tmp: Path, tiny_run: Path, generator: Path, pruned: Path):
        self.tmp, self.run, self.digits = tmp, tiny_run, tiny_run / "data" / "targets" / "digits"
        self.generator, self.pruned = generator, pruned

    def copy(self, what: Path, name: str) -> Path:
        shutil.copytree(what, self.tmp / name)
        return self.tmp / name

    def prune(self, *extra, generator=None, data=None) -> list[str]:
        return ["prune", "--generator", str(generator or self.generator), "--data", str(data or self.digits),
                "--out", str(self.tmp / "out"), *TINY, *extra]

    def finetune(self, *extra, model=None, data=None) -> list[str]:
        return ["finetune", "--model", str(model or self.pruned), "--data", str(data or self.digits),
                "--out", str(self.tmp / "out"), "runtime.device=cpu", "finetune.epochs=1", *extra]

    def meta_train(self, *extra) -> list[str]:
        d = self.run
        return ["meta-train", "runtime.device=cpu", "model.backbone=convnet", "model.width=8",
                f"data.reference={d}/data/reference", f"pretrain.out={d}/pretrain", f"meta.out={self.tmp}/meta",
                "meta.steps=2", "meta.meta_batch=1", "meta.n_way_min=2", "meta.n_way_max=2", "meta.k_shot=2",
                "meta.q_query=2", "meta.val_tasks=1", "meta.val_classes=3", "meta.encoder_dim=16",
                "meta.encoder_heads=2", "meta.encoder_inducing=4", "meta.generator_hidden=16",
                "tracking.wandb_mode=disabled", *extra]

    def pretrain(self, *extra) -> list[str]:
        return ["pretrain", "runtime.device=cpu", "pretrain.epochs=1", f"data.reference={self.run}/data/reference",
                f"pretrain.out={self.tmp}/pretrain", *extra]

    def generator_version(self, name="gen") -> Path:
        return self.copy(resolve(self.generator), name)

    def target_with(self, change, name="target") -> Path:
        target = self.copy(self.digits, name)
        edit_json(target / "manifest.json", change)
        return target

    def model_with(self, change, name="model") -> Path:
        model = self.copy(self.pruned, name)
        edit_json(model / "spec.json", change)
        return model


def _flip_generator_signs(env: Env) -> list[str]:
    gen = env.generator_version()
    weights = load_file(str(gen / "generator.safetensors"))
    keys = sorted(weights)
    save_file({k: -v if i % 7 == 0 else v for i, (k, v) in enumerate((k, weights[k]) for k in keys)},
              str(gen / "generator.safetensors"))
    return env.prune(generator=gen)


def _flip_model_bit(env: Env) -> list[str]:
    model = env.copy(env.pruned, "model")
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-5] ^= 0x10  # one bit of the last weight
    (model / "model.safetensors").write_bytes(bytes(data))
    return env.finetune(model=model)


def _pointer_without_version(env: Env) -> list[str]:
    run = env.copy(env.generator, "run")
    for name in ("best.json", "latest.json"):
        edit_json(run / "generators" / name, lambda p: p.pop("version"))
    return env.prune(generator=run)


def _pointer_escaping(env: Env) -> list[str]:
    run = env.copy(env.generator, "run")
    edit_json(run / "generators" / "best.json", lambda p: p.update(version="../../../../etc"))
    return env.prune(generator=run)


def _generator_json_without(key: str):
    def make(env: Env) -> list[str]:
        gen = env.generator_version()
        edit_json(gen / "generator.json", lambda r: r.pop(key))
        return env.prune(generator=gen)
    return make


def _generator_file(name: str, damage):
    def make(env: Env) -> list[str]:
        gen = env.generator_version()
        damage(gen / name)
        return env.prune(generator=gen)
    return make


def _model_file(damage):
    def make(env: Env) -> list[str]:
        model = env.copy(env.pruned, "model")
        damage(model / "model.safetensors")
        return env.finetune(model=model)
    return make


def _spec(change):
    return lambda env: env.finetune(model=env.model_with(change))


def _first_group(update):
    return _spec(lambda s: s["groups"][0].update(update(s["groups"][0])))


def _manifest(change):
    return lambda env: env.prune(data=env.target_with(change))


def _reference_mean_nan(env: Env) -> list[str]:
    ref = env.copy(env.run / "data" / "reference", "reference")
    text = (ref / "manifest.json").read_text()
    record = json.loads(text)
    record["mean"] = [float("nan")] * 3
    (ref / "manifest.json").write_text(json.dumps(record))  # Python writes NaN, as the probe did
    return ["pretrain", "runtime.device=cpu", f"data.reference={ref}", f"pretrain.out={env.tmp}/pretrain",
            "model.backbone=convnet", "model.width=8", "pretrain.epochs=1"]


def _convert(kind: str, make_src):
    def make(env: Env) -> list[str]:
        src = make_src(env.tmp)
        return ["data", "convert", "--from", kind, str(src), str(env.tmp / "out")]
    return make


def _npz_big_label(tmp: Path) -> Path:
    np.savez(tmp / "big.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.array([0, 10**9]))
    return tmp / "big.npz"


def _npz_huge_header(tmp: Path) -> Path:
    npz_claiming(tmp / "claim.npz", (130_000, 224, 224, 3))  # 18 GiB claimed in ~0.5 kB
    return tmp / "claim.npz"


def _tar_big_label(tmp: Path) -> Path:
    (tmp / "shards").mkdir()
    tar_with_label(tmp / "shards" / "a.tar", b"1000000000")
    return tmp / "shards"


def _yaml(text: str):
    def make(env: Env) -> list[str]:
        (env.tmp / "c.yaml").write_text(text)
        return ["pretrain", "-c", str(env.tmp / "c.yaml")]
    return make


def _out_under_a_file(command: str):
    def make(env: Env) -> list[str]:
        (env.tmp / "afile").write_text("mine")
        argv = env.prune() if command == "prune" else env.finetune()
        return [str(env.tmp / "afile" / "out") if a == str(env.tmp / "out") else a for a in argv]
    return make


def _user_backbone(source: str):
    """`stamp pretrain` on a factory in a file of the user's (the test puts ``work`` on sys.path)."""
    def make(env: Env) -> list[str]:
        (env.tmp / "user_net_bad.py").write_text(source)
        return env.pretrain("model.backbone=user_net_bad:make")
    return make


_BRANCHY = """
import torch.nn as nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x) if x.amax() > 1e6 else self.c(x)
        return self.head(x.mean((2, 3)))

def make():
    return Branchy()
"""


def _weights_of_another_architecture(env: Env) -> list[str]:
    import torch

    from stamp_dist.models.backbones import build_backbone

    torch.save(build_backbone("resnet20", 10, width=8).state_dict(), env.tmp / "resnet20.pth")
    return env.pretrain("model.backbone=convnet", "model.width=8", f"model.weights={env.tmp}/resnet20.pth")


def _without_generator(method: str):
    def make(env: Env) -> list[str]:
        argv = env.prune("--method", method)
        i = argv.index("--generator")
        return argv[:i] + argv[i + 2:]
    return make


CASES = {
    # issue 14: bring your own network
    "backbone_without_colon": (lambda env: env.pretrain("model.backbone=mynet"),
                               ["model.backbone", "package.module:function"]),
    "factory_module_missing": (lambda env: env.pretrain("model.backbone=nosuchmod:f"), ["nosuchmod", "PYTHONPATH"]),
    "factory_function_missing": (lambda env: env.pretrain("model.backbone=os:nosuchfn"), ["'os'", "nosuchfn"]),
    "factory_untraceable": (_user_backbone(_BRANCHY), ["layer 'body.b' does not run", "control flow"]),
    "weights_of_another_architecture": (_weights_of_another_architecture,
                                        ["model.weights", "resnet20.pth", "ConvNet", "missing"]),
    "weights_missing": (lambda env: env.pretrain(f"model.weights={env.tmp}/none.pth"), ["none.pth", "not found"]),
    # defect 5: sizes and label ranges checked before anything is allocated
    "npz_label_1e9": (_convert("numpy", _npz_big_label), ["label 1000000000", "fix the labels"]),
    "tar_cls_1e9": (_convert("wds", _tar_big_label), ["1000000000", "labels must be 0..C-1"]),
    "npz_header_claims_18GiB": (_convert("numpy", _npz_huge_header), ["claims shape", "corrupt or crafted"]),
    "spec_input_size_4096": (_spec(lambda s: s.update(input_size=[3, 4096, 4096])), ["input_size", "1024"]),
    # defect 6: integrity of generator and pruned-model weights
    "generator_signs_flipped": (_flip_generator_signs, ["generator.safetensors", "sha256"]),
    "pruned_model_bit_flipped": (_flip_model_bit, ["model.safetensors", "sha256"]),
    # defect 7: NaN never saved
    "finetune_lr_nan": (lambda env: env.finetune("finetune.lr=nan"), ["finetune.lr", "finite"]),
    "reference_mean_nan": (_reference_mean_nan, ["'mean'", "finite"]),
    "meta_batch_0": (lambda env: env.meta_train("meta.meta_batch=0"), ["meta.meta_batch"]),
    # defect 8: tracebacks became error lines
    "generator_safetensors_truncated": (_generator_file("generator.safetensors", truncate), ["generator.safetensors"]),
    "generator_safetensors_missing": (_generator_file("generator.safetensors", Path.unlink), ["missing"]),
    "backbone_safetensors_truncated": (_generator_file("backbone.safetensors", truncate), ["backbone.safetensors"]),
    "backbone_safetensors_missing": (_generator_file("backbone.safetensors", Path.unlink), ["missing"]),
    "model_safetensors_truncated": (_model_file(truncate), ["model.safetensors"]),
    "model_safetensors_missing": (_model_file(Path.unlink), ["missing"]),
    "generator_json_without_groups": (_generator_json_without("groups"), ["generator.json", "groups"]),
    "generator_json_without_meta": (_generator_json_without("meta"), ["generator.json", "meta"]),
    "generator_json_without_backbone": (_generator_json_without("backbone"), ["generator.json", "backbone"]),
    "pointer_without_version": (_pointer_without_version, ["best.json", "version"]),
    "pointer_outside_the_run": (_pointer_escaping, ["best.json", "v000100"]),
    "prune_out_under_a_file": (_out_under_a_file("prune"), ["is a file"]),
    "meta_out_is_a_file": (lambda env: (env.tmp / "meta").write_text("mine") and env.meta_train(), ["is a file"]),
    "finetune_out_under_a_file": (_out_under_a_file("finetune"), ["is a file"]),
    "yaml_syntax_error": (_yaml("meta:\n  steps: [1,\n"), ["c.yaml", "line"]),
    "yaml_python_tag": (_yaml("meta:\n  steps: !!python/object/apply:os.system ['touch pwned']\n"), ["c.yaml"]),
    "yaml_tab_indent": (_yaml("meta:\n\tsteps: 3\n"), ["c.yaml"]),
    "yaml_a_list": (_yaml("- 1\n- 2\n"), ["mapping"]),
    "val_every_0": (lambda env: env.meta_train("meta.val_every=0"), ["meta.val_every"]),
    "checkpoint_every_0": (lambda env: env.meta_train("meta.checkpoint_every=0"), ["meta.checkpoint_every"]),
    "val_tasks_0": (lambda env: env.meta_train("meta.val_tasks=0"), ["meta.val_tasks"]),
    "meta_lr_nan": (lambda env: env.meta_train("meta.lr=nan"), ["meta.lr", "finite"]),
    "finetune_batch_size_0": (lambda env: env.finetune("finetune.batch_size=0"), ["finetune.batch_size"]),
    "spec_groups_not_a_list": (_spec(lambda s: s.update(groups={"a": 1})), ["spec.json", "groups"]),
    "spec_mean_two_values": (_spec(lambda s: s.update(mean=[0.5, 0.5])), ["spec.json", "mean"]),
    "spec_width_a_string": (_spec(lambda s: s.update(width="8")), ["spec.json", "width"]),
    "spec_unknown_field": (_spec(lambda s: s.update(backbone_code="import os")), ["spec.json", "backbone_code"]),
    "spec_kept_strings": (_first_group(lambda g: {"kept": [str(i) for i in g["kept"]]}), ["kept"]),
    # defect 9: nonsense refused
    "meta_steps_0": (lambda env: env.meta_train("meta.steps=0"), ["meta.steps"]),
    "meta_steps_negative": (lambda env: env.meta_train("meta.steps=-5"), ["meta.steps"]),
    "finetune_epochs_negative": (lambda env: env.finetune("--epochs", "-2"), ["--epochs -2", "at least 1"]),
    "adapt_steps_negative": (lambda env: env.prune("--adapt-steps", "-3"), ["adaptation steps", "-3"]),
    "spec_kept_duplicates": (_first_group(lambda g: {"kept": [g["kept"][0]] * 2 + g["kept"][1:-1]}), ["distinct"]),
    "spec_kept_floats": (_first_group(lambda g: {"kept": [float(i) for i in g["kept"]]}), ["kept", "integers"]),
    # defect 10: messages that name the real problem
    "samples_per_class_0": (lambda env: env.prune("prune.samples_per_class=0"), ["prune.samples_per_class"]),
    # issue 14: `stamp prune --method`
    "method_unknown": (lambda env: env.prune("--method", "obd"), ["'obd'", "choose one of", "l1"]),
    "method_stamp_without_generator": (_without_generator("stamp"), ["stamp", "--generator", "another --method"]),
    "method_l1_backbone_missing": (lambda env: env.prune("--method", "l1", "--backbone", str(env.tmp / "none")),
                                   [str(Path("work") / "none")]),
    "k_shot_0": (lambda env: env.meta_train("meta.k_shot=0"), ["meta.k_shot"]),
    "q_query_0": (lambda env: env.meta_train("meta.q_query=0"), ["meta.q_query"]),
    "tau_0": (lambda env: env.meta_train("meta.tau=0"), ["meta.tau"]),
    "manifest_channels_string": (_manifest(lambda m: m.update(channels="3")), ["'channels'", "integer 3"]),
    "swapped_generator_backbone": (_generator_file("backbone.safetensors", lambda p: shutil.copy(
        p.parent.parent.parent / "pruned_backbone_swap.safetensors", p)), ["generator artifact", "damaged"]),
    # defect 12: shards confined to the dataset directory
    "manifest_shard_etc_passwd": (_manifest(lambda m: m["splits"]["train"]["shards"][0].append("/etc/passwd")),
                                  ["/etc/passwd", "inside the dataset directory"]),
    "manifest_shard_dotdot": (_manifest(lambda m: m["splits"]["train"]["shards"][0].append("../../x.tar")),
                              ["../../x.tar"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_an_error_line_and_leaves_nothing(case, tiny_run, tiny_generator, pruned, tmp_path,
                                                                 capsys, monkeypatch):
    make, words = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.syspath_prepend(str(work))  # where a case writes its own network's module
    monkeypatch.setattr("sys.dont_write_bytecode", True)  # importing it writes nothing
    # The swapped-backbone case copies another backbone (a different width) over the generator's.
    from stamp_dist.models.backbones import build_backbone

    save_file(build_backbone("convnet", 12, width=4).state_dict(), str(tmp_path / "pruned_backbone_swap.safetensors"))
    argv = make(Env(work, tiny_run, tiny_generator, pruned))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in last, last
    assert "lower meta.lr" not in last and "re-run `stamp pretrain`" not in last and "NaN" not in last
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind
    assert not (work / "pwned").exists()


# --- a full or read-only disk (a real tmpfs; root only, skipped where mounting is not allowed) ----------------

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; the test may remount it read-only. Unmounted afterwards."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_prune_to_an_unwritable_disk_fails_before_computing(fault, small_disk, tiny_generator, tiny_run, capsys,
                                                            monkeypatch):
    """Defect 8 of issue 15: ENOSPC / EROFS failed only after all the compute, with a traceback."""
    import subprocess

    from stamp_dist import methods

    if fault == "full":
        _fill(small_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = snapshot(small_disk)
    monkeypatch.setattr(methods, "load_generator", lambda *a, **k: pytest.fail("computed before checking"))
    argv = ["prune", "--generator", str(tiny_generator), "--data", str(tiny_run / "data/targets/digits"),
            "--out", str(small_disk / "out"), *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write output directory") and "Traceback" not in err
    assert ("No space left" if fault == "full" else "Read-only") in err
    assert snapshot(small_disk) == before


def test_disk_full_in_the_middle_of_a_conversion_leaves_nothing(small_disk, tiny_run, capsys):
    """The space runs out after the up-front check passed: an ``error:`` line (exit 2) and no partial dataset."""
    src = tiny_run / "data" / "targets" / "digits"
    from stamp_dist.data.readers import load_split

    x, y, manifest = load_split(src, "train")
    np.savez(small_disk.parent / "digits.npz", x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    assert main(["data", "convert", "--from", "numpy", str(small_disk.parent / "digits.npz"),
                 str(small_disk / "out")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device") and "Traceback" not in err
    assert list(small_disk.iterdir()) == []
