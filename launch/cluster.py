#!/usr/bin/env python
"""Distributed meta-training on a running Ray cluster (started with `ray start`, e.g. by slurm/meta_train.sbatch).

    python launch/cluster.py -c configs/imagenet_resnet50.yaml [--address auto|HOST:PORT] [--workers N] [key=value ...]

Run it on a node of the cluster (the default address ``auto`` finds the local head). Every node must
see the config's data, pretrain and run directories at the same paths and have stamp_dist installed.
Equivalent to `stamp meta-train -c CONFIG runtime.backend=ray runtime.address=ADDRESS ...`; re-running
it resumes from the run's last checkpoint.
"""

import argparse
import sys

from stamp_dist.cli import main


def parse(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config (e.g. configs/imagenet_resnet50.yaml)")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--workers", type=int, help="DeepSpeed workers, one per GPU (runtime.num_workers)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    extra = [f"runtime.num_workers={args.workers}"] * (args.workers is not None)
    return ["meta-train", "-c", args.config, *args.overrides, "runtime.backend=ray",
            f"runtime.address={args.address}", *extra]


if __name__ == "__main__":
    sys.exit(main(parse()))
