"""The ``stamp`` command. Each subcommand parses arguments, loads the config and calls the library;
heavy imports happen inside the handlers so ``stamp --help`` stays instant."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import StampError

CONVERT_SOURCES = ("imagefolder", "cifar10", "cifar100", "svhn", "numpy", "wds")


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
    from .data.demo import make_demo_data

    cfg = _config(args)
    make_demo_data(args.out, cfg.data)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .pretrain import pretrain

    pretrain(_config(args))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stamp", description="Set-based Task-Adaptive Meta-Pruning: meta-train a mask generator, prune for a new dataset."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, parent=sub, config: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if config:
            _add_config_args(p)
        return p

    command("demo", _cmd_demo, "run the built-in demo end to end (data → pretrain → …), caching finished stages")

    data = sub.add_parser("data", help="make, convert and inspect per-class shard datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = command("convert", _cmd_data_convert, "convert a dataset to per-class WebDataset shards", dsub, config=False)
    p.add_argument("--from", dest="source", required=True, choices=CONVERT_SOURCES, help="source format")
    p.add_argument("src", help="source path (folder or file, depending on --from)")
    p.add_argument("out", help="output dataset directory (must not exist)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to N×N (default: keep the source size)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    p = command("demo", _cmd_data_demo, "write the built-in demo datasets (synthetic reference + digits targets)", dsub)
    p.add_argument("out", help="output directory")
    p = command("info", _cmd_data_info, "print classes, counts, shards and image size of a dataset", dsub, config=False)
    p.add_argument("dir", help="dataset directory (holds manifest.json)")

    command("pretrain", _cmd_pretrain, "train a backbone on the reference dataset (resumes from pretrain.out)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except StampError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
