"""Episodes/s the sampler actors can produce vs episodes/s the DeepSpeed workers consume, and the
workers' data-wait fraction (time blocked waiting for episodes / step time; the goal is < 5%).

On one local Ray instance (127.0.0.1, no dashboard):

1. pool: the sampler actors feed one driver-side ``EpisodeStream`` that takes episodes as fast as it can,
   with a deep prefetch, after a warm-up pass that fills the class buffers: the pool's capacity;
2. for each worker count: a short distributed meta-training run (``runtime.backend=ray``) on the same
   data and sampler settings; its ``summary.json`` gives the episodes/s the workers consumed and their
   data-wait fraction, both over steady-state steps (the first step after start is left out).

    python benchmarks/sampler_throughput.py [-c configs/demo_ray.yaml] [--steps 30] [--workers 1 2] [key=value ...]
    python benchmarks/sampler_throughput.py --toy     # a 12-class demo and a 1-epoch ConvNet, made in a temp dir

The default config needs the demo's data and backbone (`stamp data demo runs/demo/data` and
`stamp pretrain -c configs/demo.yaml`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

TOY = ["model.backbone=convnet", "model.width=8", "data.demo_classes=12", "data.demo_train_per_class=24",
       "data.demo_test_per_class=8", "pretrain.epochs=1", "pretrain.batch_size=32", "meta.n_way_min=2",
       "meta.n_way_max=3", "meta.k_shot=3", "meta.q_query=3", "meta.val_tasks=2", "meta.val_classes=3",
       "meta.encoder_dim=16", "meta.encoder_heads=2", "meta.encoder_inducing=4", "meta.generator_hidden=16"]


def toy_overrides(root: Path) -> list[str]:
    """Build the toy reference data and backbone under ``root``; the overrides that point at them."""
    from stamp_dist.config import load_config
    from stamp_dist.data.demo import make_demo_data
    from stamp_dist.pretrain import pretrain

    paths = [f"data.root={root}/data", f"data.reference={root}/data/reference", f"pretrain.out={root}/pretrain"]
    cfg = load_config(None, [*TOY, *paths])
    make_demo_data(cfg.data.root, cfg.data)
    pretrain(cfg)
    return [*TOY, *paths]


def pool_rate(cfg, seconds: float, prefetch: int) -> float:
    """Episodes/s the sampler actors serve to one consumer that never computes (``cfg.meta.steps`` must not
    run out within ``seconds``)."""
    import ray

    from stamp_dist.data.episodes import EpisodeStream, MetaClasses
    from stamp_dist.distributed.sampler import SamplerPool

    m = cfg.meta
    classes = MetaClasses.of(cfg.data.reference, m).train
    pool = SamplerPool.start(cfg, classes, "bench")
    try:
        ray.get([pool.request(c, m.k_shot + m.q_query, (0,)) for c in classes])  # warm-up: every class buffer filled
        stream = EpisodeStream(pool, classes, m, 0, m.meta_batch, prefetch)
        stream.take(0)
        t0, step, taken = time.perf_counter(), 1, 0
        while time.perf_counter() - t0 < seconds:
            taken += len(stream.take(step)[0])
            step += 1
        return taken / (time.perf_counter() - t0)
    finally:
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo_ray.yaml")
    parser.add_argument("--toy", action="store_true", help="make a tiny demo setup in a temp dir instead")
    parser.add_argument("--steps", type=int, default=30, help="meta-steps per worker-count run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pool-seconds", type=float, default=10.0)
    parser.add_argument("--pool-prefetch", type=int, default=32)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from stamp_dist.config import load_config
    from stamp_dist.distributed.launch import local_cpus, meta_train_ray, start_ray

    tmp = Path(tempfile.mkdtemp(prefix="sampler_bench_"))
    base = [*toy_overrides(tmp), *args.overrides] if args.toy else list(args.overrides)
    run = [*base, "runtime.backend=ray", "runtime.address=null", f"meta.steps={args.steps}",
           f"meta.val_every={args.steps}", f"meta.checkpoint_every={args.steps}", "tracking.wandb_mode=disabled"]
    cfg = load_config(args.config, [*run, f"runtime.num_workers={max(args.workers)}"])
    r = cfg.runtime
    start_ray(r, local_cpus(r))

    results = {"config": args.config if not args.toy else "toy", "cpus": os.cpu_count(), "platform": platform.platform(),
               "sampler_actors": r.sampler_actors, "meta_batch": cfg.meta.meta_batch,
               "pool_episodes_per_s": pool_rate(load_config(args.config, [*run, "meta.steps=1000000000"]), args.pool_seconds,
                                         args.pool_prefetch), "workers": {}}
    print(f"sampler pool ({r.sampler_actors} actors): {results['pool_episodes_per_s']:.1f} episodes/s")
    for w in args.workers:
        out = tmp / f"run_{w}"
        meta_train_ray(load_config(args.config, [*run, f"runtime.num_workers={w}", f"meta.out={out}"]))
        summary = json.loads((out / "summary.json").read_text())
        results["workers"][w] = {k: summary[k] for k in ("episodes_per_s", "data_wait_fraction", "steady_steps")}
        print(f"{w} worker(s): consumed {summary['episodes_per_s']:.1f} episodes/s, "
              f"data-wait {100 * summary['data_wait_fraction']:.1f}% of step time ({summary['steady_steps']} steps)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
