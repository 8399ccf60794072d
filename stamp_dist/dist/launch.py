"""Start (or join) Ray and run distributed meta-training: `stamp meta-train` with ``runtime.backend=ray``.

Without ``runtime.address`` a local Ray instance starts, bound to ``runtime.host`` (127.0.0.1 by
default) and without a dashboard; with it (``auto`` or ``HOST:PORT``) the run joins that cluster,
whose nodes must see the run directory and have stamp_dist installed. The launcher creates the
sampler actors and the aggregator, then runs a Ray Train ``TorchTrainer`` whose storage is the run
directory (``meta.out/train``): re-running the same command resumes from the latest checkpoint
there. SIGTERM or SIGUSR1 (SLURM's pre-timeout signal) makes the workers checkpoint and stop.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from pathlib import Path

from ..atomic import read_json
from ..config import RuntimeConfig, StampConfig, from_dict, to_dict
from ..data.episodes import split_classes, task_families
from ..data.manifest import Manifest
from ..meta.artifact import GeneratorStore
from ..signals import stop_requests
from .learner import deepspeed_config
from .worker import STOP_FILE

LOOPBACK = ("127.0.0.1", "localhost")
PATHS = (("data", "root"), ("data", "reference"), ("pretrain", "out"), ("meta", "out"), ("tracking", "dir"))


def worker_env(runtime: RuntimeConfig) -> dict[str, str]:
    """Environment of Ray's processes: DeepSpeed's CPU accelerator off-GPU, and one cache for its JIT-built ops
    (``deepspeed_shm_comm`` takes ~40 s to compile the first time)."""
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    if not runtime.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def local_cpus(runtime: RuntimeConfig) -> int:
    """Logical CPUs for a local Ray instance: ``runtime.num_cpus``, else at least what the run reserves
    (workers and sampler actors), so that a small machine oversubscribes instead of waiting forever."""
    wanted = runtime.num_workers * runtime.cpus_per_worker + runtime.sampler_actors * runtime.sampler_cpus
    return runtime.num_cpus or max(os.cpu_count() or 1, math.ceil(wanted))


def start_ray(runtime: RuntimeConfig, num_cpus: int | None = None) -> bool:
    """Join ``runtime.address`` or start a local Ray on ``runtime.host``; False if this process was already connected."""
    import ray

    if ray.is_initialized():
        return False
    if not sys.stdout.isatty():  # this process prints the workers' output: no colour codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    runtime_env = {"env_vars": worker_env(runtime)}
    if runtime.address:
        ray.init(address=runtime.address, runtime_env=runtime_env)
        return True
    if runtime.host in LOOPBACK:
        # Ray replaces a loopback node address with the machine's outward IP (resolve_ip_for_localhost)
        # unless its cluster mode is off; off, every Ray process binds to 127.0.0.1. The constant is read at
        # import in this process; the variable reaches the processes Ray starts.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=runtime.host, runtime_env=runtime_env)
    return True


def _absolute_paths(cfg: StampConfig) -> StampConfig:
    """Actors and workers do not share the launcher's working directory."""
    d = to_dict(cfg)
    for section, key in PATHS:
        d[section][key] = str(Path(d[section][key]).resolve())
    return from_dict(d)


def _warn_if_short(runtime: RuntimeConfig, sampler_actors: int) -> None:
    """Ray Train waits (forever) for resources it cannot get; say so up front."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": runtime.num_workers * runtime.cpus_per_worker + sampler_actors * runtime.sampler_cpus,
            "GPU": runtime.num_workers if runtime.use_gpu else 0}
    for kind, n in need.items():
        if n > have.get(kind, 0):
            print(f"meta-train: warning: the run reserves {n:g} {kind}s, the Ray cluster has {have.get(kind, 0):g}; "
                  "it waits until enough nodes join", file=sys.stderr, flush=True)


def meta_train_ray(cfg: StampConfig) -> Path:
    """Train (or resume) on Ray Train + DeepSpeed workers; returns the run's generator store."""
    cfg = _absolute_paths(cfg)
    m, r = cfg.meta, cfg.runtime
    deepspeed_config(cfg, r.num_workers)  # unsupported settings fail here, not inside every worker
    read_json(Path(cfg.pretrain.out) / "backbone.json", "pretrained backbone record (run `stamp pretrain`)")
    out = Path(m.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    # A stop request → ``STOP`` in the run directory, which the workers check after every step. From
    # here on, a stop request during Ray's start-up is kept, not fatal.
    with stop_requests(lambda: (out / STOP_FILE).touch()):
        _fit(cfg)
    summary = read_json(out / "summary.json", "run summary")
    if summary["episodes_per_s"] is not None:
        print(f"meta-train: step {summary['step']} on {summary['world_size']} workers: "
              f"{summary['episodes_per_s']:.1f} episodes/s, data wait {summary['data_wait_fraction']:.1%} of step time")
    if summary["stopped"]:
        (out / STOP_FILE).unlink(missing_ok=True)
        print(f"meta-train: stopped at step {summary['step']} with a checkpoint; run the same command to resume")
    return GeneratorStore(out).root


def _fit(cfg: StampConfig) -> None:
    """Start or join Ray, create the sampler actors and the aggregator, run the TorchTrainer, clean up."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .aggregator import Aggregator
    from .sampler import NAMESPACE, SamplerPool
    from .worker import train_loop

    m, r = cfg.meta, cfg.runtime
    manifest = Manifest.load(cfg.data.reference)
    train_classes, val_classes = split_classes(manifest.num_classes, m.val_classes, m.seed)
    families = task_families(m.task_families, manifest, train_classes, m.n_way_min)
    started = start_ray(r, local_cpus(r))
    _warn_if_short(r, min(r.sampler_actors, len(train_classes)))
    tag = f"{Path(m.out).name}-{uuid.uuid4().hex[:8]}"  # actor names unique per launch: a dead launch's may linger
    samplers = SamplerPool.start(cfg, train_classes, tag)
    # The aggregator's only state is on disk and a re-sent version overwrites atomically: safe to restart and retry.
    aggregator = ray.remote(Aggregator).options(name=f"{tag}-aggregator", namespace=NAMESPACE, num_cpus=0,
                                                max_restarts=3, max_task_retries=-1).remote(to_dict(cfg))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "samplers": samplers, "aggregator": aggregator,
                           "train_classes": train_classes, "families": families, "val_classes": val_classes},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker} | ({"GPU": 1} if r.use_gpu else {})),
        run_config=RunConfig(name="train", storage_path=m.out,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_kept),
                             worker_runtime_env={"env_vars": worker_env(r)}),
    )
    try:
        trainer.fit()
    finally:
        samplers.shutdown()
        ray.kill(aggregator)
        if started:
            ray.shutdown()
