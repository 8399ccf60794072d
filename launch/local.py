#!/usr/bin/env python
"""Distributed meta-training on this machine: a local Ray instance (bound to 127.0.0.1, no dashboard),
sampler actors and Ray Train + DeepSpeed worker processes.

    python launch/local.py -c configs/demo_ray.yaml [--workers N] [--samplers N] [key=value ...]

Equivalent to `stamp meta-train -c CONFIG runtime.backend=ray runtime.address=null ...`. Re-running the
same command resumes the run from its last checkpoint; Ctrl-C aborts it, SIGTERM/SIGUSR1 checkpoint and stop.
"""

import argparse
import sys

from stamp_dist.cli import main


def parse(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config (e.g. configs/demo_ray.yaml)")
    parser.add_argument("--workers", type=int, help="DeepSpeed worker processes (runtime.num_workers)")
    parser.add_argument("--samplers", type=int, help="sampler actors (runtime.sampler_actors)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    extra = [f"runtime.num_workers={args.workers}"] * (args.workers is not None)
    extra += [f"runtime.sampler_actors={args.samplers}"] * (args.samplers is not None)
    return ["meta-train", "-c", args.config, *args.overrides, "runtime.backend=ray", "runtime.address=null", *extra]


if __name__ == "__main__":
    sys.exit(main(parse()))
