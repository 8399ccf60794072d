"""The ``stamp`` command. Each subcommand parses arguments, loads the config and calls the library;
heavy imports happen inside the handlers so ``stamp --help`` stays instant."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Sequence

from .choices import BUDGET_KINDS, METHOD_NAMES
from .errors import EXIT_STOPPED, EXIT_USER_ERROR, StampError, Stopped

CONVERT_SOURCES = ("imagefolder", "cifar10", "cifar100", "svhn", "numpy", "wds", "idx")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. meta.steps=100")


def _config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _cmd_data_convert(args: argparse.Namespace) -> None:
    from .data.convert import convert

    manifest = convert(args.source, args.src, args.out, image_size=args.image_size, shard_size=args.shard_size)
    counts = {s: sum(i.counts) for s, i in manifest.splits.items()}
    print(f"wrote {args.out}: {manifest.num_classes} classes, images per split {counts}")


def _cmd_data_info(args: argparse.Namespace) -> None:
    from .data.convert import describe

    print(describe(args.dir))


def _cmd_data_demo(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .data.demo import make_demo_data

    make_demo_data(args.out, cfg.data)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .pretrain import pretrain

    pretrain(cfg)


def _cmd_meta_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .metatrain import meta_train

    print(f"generators: {meta_train(cfg)}")


def _cmd_prune(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .methods import method_named, prune_with

    method = method_named(args.method)
    p = cfg.prune
    if args.adapt_steps is not None:
        if args.adapt_steps < 0:
            raise StampError(f"--adapt-steps {args.adapt_steps}: adaptation steps must be an integer >= 0; "
                             "0 uses the generator as is")
        p.adapt_steps = args.adapt_steps
    if args.budget_kind is not None:
        p.budget_kind = args.budget_kind
    # Flags of another method are ignored with a warning rather than refused: one command line can then be
    # rerun with each --method.
    for flag, value, used in (("--generator", args.generator, method.uses_generator),
                              ("--adapt-steps", args.adapt_steps, method.uses_generator),
                              ("--backbone", args.backbone, not method.uses_generator),
                              ("--budget", args.budget, method.prunes)):
        if value is not None and not used:
            print(f"warning: {flag} is not used by --method {method.name}; ignored", file=sys.stderr)
    report = prune_with(method.name, args.data, args.budget if args.budget is not None else p.budget, args.out, cfg,
                        generator=args.generator, backbone=args.backbone, device=cfg.runtime.device)
    latency = "" if report["budget_kind"] != "latency" else (
        f"; latency budget: {report['latency_ratio']:.3f} of dense measured at batch {report['latency_batch']} "
        f"({report['latency_ratio_predicted']:.3f} predicted)")
    print(f"pruned model ({method.name}) → {args.out}: MACs {report['macs_ratio']:.3f} of dense, params "
          f"{report['params_ratio']:.3f}, latency (batch 64) {report['latency_ms_b64']:.1f} ms vs dense "
          f"{report['dense_latency_ms_b64']:.1f} ms{latency}, made in {report['seconds_to_prune']:.2f} s")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_model

    r = export_model(args.model, args.format, args.out)
    print(f"exported {args.model} → {r.path} ({r.format}, {r.bytes / 1e6:.2f} MB, input [batch, "
          f"{', '.join(map(str, r.input_shape))}]); max |{r.format} - PyTorch| on a check batch {r.max_abs_diff:.2g}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .finetune import finetune

    f = cfg.finetune
    result = finetune(args.model, args.data, args.out, args.epochs if args.epochs is not None else f.epochs, f,
                      device=cfg.runtime.device, runtime=cfg.runtime)
    print(f"fine-tuned model → {args.out}: top-1 {result['top1']:.4f} on the test split "
          f"({result['train_images']} training images, {result['seconds']:.1f} s, "
          f"{result['images_per_s']:.0f} images/s)")


def _cmd_bench(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .bench import run_bench, write_report

    command = " ".join(["stamp bench", *(["-c", args.config] if args.config else []), *args.overrides])
    report = write_report(run_bench(cfg), cfg.bench.out, command)
    print(f"report → {cfg.bench.out}/report.md ({len(report['cells'])} cells, "
          f"{sum(map(len, report['plots'].values()))} plots)")


def _cmd_demo(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .demo import run_demo

    run_demo(cfg)


def _cmd_slurm_submit(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from .slurm import prepare, submit

    sub = prepare(cfg, args.config, args.overrides, job=args.job, array=args.array, wait=args.wait, data=args.data,
                  budgets=args.budget, out=args.out)
    status = submit(sub, dry_run=args.dry_run)
    if status:
        raise SystemExit(status)  # the job's exit code (with --wait), or sbatch's


def _examples(*lines: str) -> dict:
    """Parser settings for a help text that ends with runnable examples (paths as `stamp demo` leaves them)."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


DIGITS = "runs/demo/data/targets/digits"
CONVERT_EXAMPLE = "stamp data convert --from imagefolder path/to/images runs/mydata --image-size 32"
PRUNE_EXAMPLE = (f"stamp prune -c configs/demo.yaml --generator runs/demo/meta --data {DIGITS} --budget 0.25 "
                 "--out runs/digits-b0.25")
PRUNE_L1_EXAMPLE = (f"stamp prune -c configs/demo.yaml --method l1 --data {DIGITS} --budget 0.25 --out runs/digits-l1"
                    "    # pretrain.out's backbone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stamp", description="Set-based Task-Adaptive Meta-Pruning: meta-train a mask generator, prune for a new "
        "dataset.", **_examples("stamp demo -c configs/demo.yaml    # the whole pipeline on built-in data",
                                PRUNE_EXAMPLE))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, examples: tuple[str, ...], parent=sub,
                config: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, **_examples(*examples))
        p.set_defaults(handler=handler)
        if config:
            _add_config_args(p)
        return p

    command("demo", _cmd_demo, "run the built-in demo end to end (data → pretrain → …), caching finished stages",
            ("stamp demo -c configs/demo.yaml",
             "stamp demo -c configs/demo.yaml 'bench.budgets=[0.1]' bench.out=runs/demo/results-b0.1"
             "    # reuses data, backbone, generator"))
    command("bench", _cmd_bench, "compare every pruning method per target, budget and data regime; write "
            "report.md, report.json and plots to bench.out (finished cells are cached)",
            ("stamp bench -c configs/bench.yaml    # after `stamp demo` (its data, backbone and generator)",
             "stamp bench -c configs/bench.yaml 'bench.methods=[dense,l1,stamp]' 'bench.budgets=[0.25]'"))

    data = sub.add_parser("data", help="make, convert and inspect per-class shard datasets",
                          description="make, convert and inspect per-class shard datasets",
                          **_examples(CONVERT_EXAMPLE, f"stamp data info {DIGITS}"))
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = command("convert", _cmd_data_convert, "convert a dataset to per-class WebDataset shards",
                (CONVERT_EXAMPLE + "    # path/to/images/{train,test}/<class>/*.jpg",
                 "stamp data convert --from cifar10 path/to/cifar-10-batches-py runs/cifar10"), dsub, config=False)
    p.add_argument("--from", dest="source", required=True, choices=CONVERT_SOURCES, help="source format")
    p.add_argument("src", help="source path (folder or file, depending on --from)")
    p.add_argument("out", help="output dataset directory (must not exist)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the network's input size N×N: JPEGs are stored as they are and, when read, resized (shorter "
                   "side to round(N / 0.875), torchvision's 256 for 224) and centre-cropped; other images are resized "
                   "(shorter side to N) and centre-cropped here (default: keep the source size)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    p = command("demo", _cmd_data_demo, "write the built-in demo datasets (synthetic reference + digits targets)",
                ("stamp data demo runs/demo/data -c configs/demo.yaml",), dsub, config=False)
    p.add_argument("out", help="output directory")
    _add_config_args(p)
    p = command("info", _cmd_data_info, "print classes, counts, shards and image size of a dataset",
                (f"stamp data info {DIGITS}",), dsub, config=False)
    p.add_argument("dir", help="dataset directory (holds manifest.json)")

    command("pretrain", _cmd_pretrain, "train a backbone on the reference dataset (resumes from pretrain.out)",
            ("stamp pretrain -c configs/demo.yaml",
             "stamp pretrain -c configs/demo.yaml pretrain.epochs=10 pretrain.out=runs/pretrain-10ep"))
    command("meta-train", _cmd_meta_train, "meta-train the set encoder + mask generator (resumes from meta.out)",
            ("stamp meta-train -c configs/demo.yaml",
             "stamp meta-train -c configs/demo_ray.yaml    # on Ray: DeepSpeed workers + sampler actors"))
    p = command("prune", _cmd_prune, "prune the backbone for a target dataset: with STAMP's meta-trained generator, "
                "or with another method (the same pruned-model artifact for every method)",
                (PRUNE_EXAMPLE, PRUNE_L1_EXAMPLE))
    p.add_argument("--method", default="stamp", metavar="METHOD",
                   help=f"pruning method: {', '.join(METHOD_NAMES)} (default stamp; dense keeps every channel)")
    p.add_argument("--generator", help="stamp: generator artifact directory, or a meta-train run (uses best)")
    p.add_argument("--backbone", help="every method but stamp: the pretrained backbone directory (default "
                   "pretrain.out); stamp prunes its generator's own backbone")
    p.add_argument("--data", required=True, help="target dataset directory (per-class shards)")
    p.add_argument("--budget", type=float, help="fraction of the dense network's MACs (or latency: --budget-kind) to "
                   "keep, in (0, 1] (default prune.budget)")
    p.add_argument("--budget-kind", choices=BUDGET_KINDS, help="what --budget is a fraction of: macs, or latency "
                   "measured on this device at prune.latency_batch images (a table measured once and cached next "
                   "to the backbone; default prune.budget_kind)")
    p.add_argument("--out", required=True, help="output directory for the pruned model (must not exist)")
    p.add_argument("--adapt-steps", type=int, help="stamp: generator adaptation steps on the target "
                   "(default prune.adapt_steps)")
    p = command("finetune", _cmd_finetune, "fine-tune a pruned model on its target and report top-1",
                (f"stamp finetune -c configs/demo.yaml --model runs/digits-b0.25 --data {DIGITS} --out runs/digits-ft",
                 f"stamp finetune -c configs/demo.yaml --model runs/digits-b0.25 --data {DIGITS} --epochs 5 "
                 "--out runs/digits-ft5"))
    p.add_argument("--model", required=True, help="pruned model directory (written by `stamp prune`)")
    p.add_argument("--data", required=True, help="target dataset directory")
    p.add_argument("--epochs", type=int, help="epochs (default finetune.epochs)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")

    p = command("export", _cmd_export, "export a pruned or fine-tuned model to ONNX or torch.export, checked "
                "against PyTorch (ONNX needs: pip install 'stamp_dist[export]')",
                ("stamp export --model runs/digits-b0.25 --format onnx    # → runs/digits-b0.25/model.onnx",
                 "stamp export --model runs/digits-ft --format torch.export --out deploy/digits.pt2"), config=False)
    p.add_argument("--model", required=True, help="pruned model directory (written by `stamp prune` or `stamp finetune`)")
    p.add_argument("--format", required=True, help="onnx or torch.export (export.ExportFormat)")
    p.add_argument("--out", help="output file (default <model>/model.onnx or <model>/model.pt2; must not exist)")

    submit_examples = ("stamp slurm submit -c configs/imagenet_resnet50.yaml --dry-run    # print it, submit nothing",
                       "stamp slurm submit -c configs/demo.yaml --job prune --budget 0.5 --budget 0.25 --wait")
    slurm = sub.add_parser("slurm", help="submit meta-training, pruning and bench jobs to SLURM (docs/SLURM.md)",
                           description="submit meta-training, pruning and bench jobs to SLURM (docs/SLURM.md)",
                           **_examples(*submit_examples))
    ssub = slurm.add_subparsers(dest="slurm_command", required=True, metavar="SLURM_COMMAND")
    p = command("submit", _cmd_slurm_submit, "render a slurm/*.sbatch script's #SBATCH lines from the config "
                "(section slurm) and submit it with sbatch", submit_examples, ssub)
    p.add_argument("--job", choices=("meta-train", "prune", "bench"), default="meta-train",
                   help="which slurm/*.sbatch script (default meta-train)")
    p.add_argument("--array", help="sbatch --array spec (prune: default one task per --budget)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit with its exit code")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    p.add_argument("--data", help="prune: target dataset directory (default the first of bench.targets)")
    p.add_argument("--budget", type=float, action="append", default=[],
                   help="prune: MACs fraction; repeat for an array of budgets (default prune.budget)")
    p.add_argument("--out", help="prune: output directory, one budget-<B>/ per budget "
                   "(default <meta.out>/pruned/<target>)")
    return parser


# Write failures of the environment rather than of the code (full disk, read-only or forbidden location):
# reported as user errors, with the path.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                errno.ENAMETOOLONG, errno.EMFILE}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is 0, EXIT_USER_ERROR, EXIT_STOPPED or 130 (errors.py)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except StampError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return EXIT_STOPPED
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        hint = "free some space or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
            "check the path and that it may be written"
        print(f"error: {e.strerror}{where}; {hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
