"""Start (or join) Ray and run distributed meta-training: `stamp meta-train` with ``runtime.backend=ray``.

Without ``runtime.address`` a local Ray instance starts, bound to ``runtime.host`` (127.0.0.1 by
default) and without a dashboard; with it (``auto`` or ``HOST:PORT``) the run joins that cluster,
whose nodes must see the run directory and have stamp_dist installed. The launcher creates the
sampler actors and the aggregator, then runs a Ray Train ``TorchTrainer`` whose storage is the run
directory (``meta.out/train``): re-running the same command resumes from the latest checkpoint
there (safetensors + JSON only: a checkpoint holding anything else is refused before Ray starts).
SIGTERM, SIGUSR1 (SLURM's pre-timeout signal) or Ctrl-C makes the workers checkpoint at the end of
the step and stop; the command then raises ``Stopped`` (exit status 75). Ray installs its own SIGTERM
and SIGINT handlers (``ray.init``, ``TrainController``), so the launcher takes the signals back after
``ray.init`` and runs ``fit`` outside the main thread, where Ray Train installs none.
A local run (Ray on 127.0.0.1) keeps every socket of its workers on loopback (``rendezvous.py``).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

from ..atomic import read_json
from ..checkpoint import check_checkpoint_dir
from ..config import RuntimeConfig, StampConfig, from_dict, to_dict
from ..data.episodes import MetaClasses
from ..errors import StampError
from ..meta.trainer import finished
from ..signals import install, stop_requests
from .engine import deepspeed_config
from .worker import STOP_FILE

LOOPBACK = ("127.0.0.1", "localhost")
PATHS = (("data", "root"), ("data", "reference"), ("pretrain", "out"), ("meta", "out"), ("tracking", "dir"))


def is_local(runtime: RuntimeConfig) -> bool:
    """The run stays on this machine's loopback: a Ray started here on a loopback host, or joined at a loopback address."""
    if runtime.address is None:
        return runtime.host in LOOPBACK
    host = runtime.address.rpartition(":")[0] or runtime.address
    return host in LOOPBACK or host.startswith("127.")


def worker_env(runtime: RuntimeConfig) -> dict[str, str]:
    """Environment of Ray's processes: DeepSpeed's CPU accelerator off-GPU, one cache for its JIT-built ops
    (``deepspeed_shm_comm`` takes ~40 s to compile the first time), and for a local run gloo's and NCCL's
    connections on the loopback interface (else they bind to the address the host name resolves to)."""
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "torch_extensions"))}
    if not runtime.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    if is_local(runtime) and loopback:
        env |= {"GLOO_SOCKET_IFNAME": loopback[0], "NCCL_SOCKET_IFNAME": loopback[0]}
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
    # Ray's processes inherit this environment. A wandb-core service this process started (a local run
    # before, in the same process) must not become theirs: a killed worker's run would stay "in use"
    # there, and the restarted worker could not resume it.
    os.environ.pop("WANDB_SERVICE", None)
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


def check_checkpoints(train_dir: Path) -> None:
    """Every Ray Train checkpoint of the run holds only stamp_dist's safetensors + JSON (checked before
    anything starts; the workers check again before loading)."""
    for checkpoint in sorted(train_dir.glob("checkpoint_*")):
        if checkpoint.is_dir():
            check_checkpoint_dir(checkpoint)


def meta_train_ray(cfg: StampConfig) -> Path:
    """Train (or resume) on Ray Train + DeepSpeed workers; returns the run's generator store.
    Raises ``Stopped`` when a stop request ended the run early (it checkpointed first)."""
    cfg = _absolute_paths(cfg)
    m, r = cfg.meta, cfg.runtime
    deepspeed_config(cfg, r.num_workers)  # unsupported settings fail here, not inside every worker
    read_json(Path(cfg.pretrain.out) / "backbone.json", "pretrained backbone record (run `stamp pretrain`)")
    out = Path(m.out)
    check_checkpoints(out / "train")
    out.mkdir(parents=True, exist_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    # A stop request → ``STOP`` in the run directory, which the workers check after every step. From
    # here on, a stop request during Ray's start-up is kept, not fatal.
    request = lambda: (out / STOP_FILE).touch()  # noqa: E731
    with stop_requests(request) as stop:
        _fit(cfg, lambda: install(stop, request))
    (out / STOP_FILE).unlink(missing_ok=True)
    return finished(read_json(out / "summary.json", "run summary"), m)


def _user_error(e: BaseException, seen: set[int] | None = None) -> StampError | None:
    """The ``StampError`` a worker raised, from inside Ray Train's failure (which wraps it), if any."""
    seen = set() if seen is None else seen
    if e is None or id(e) in seen:
        return None
    seen.add(id(e))
    if isinstance(e, StampError):
        return e
    inner = [*getattr(e, "worker_failures", {}).values(), getattr(e, "controller_failure", None),
             getattr(e, "_base_exc", None), getattr(e, "cause", None), e.__cause__, e.__context__]
    return next((found for x in inner if isinstance(x, BaseException) and (found := _user_error(x, seen))), None)


def _run_in_thread(fit) -> None:
    """``fit()`` in a helper thread while the main thread waits, so that our signal handlers stay in charge
    (signals are handled in the main thread; Ray Train installs its SIGINT handler only there)."""
    outcome: dict = {}

    def run() -> None:
        try:
            fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]


def _fit(cfg: StampConfig, take_signals) -> None:
    """Start or join Ray, create the sampler actors and the aggregator, run the TorchTrainer, clean up.
    ``take_signals()`` re-installs the stop handlers once ``ray.init`` has replaced them."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .aggregator import Aggregator
    from .rendezvous import LoopbackTorchConfig
    from .sampler import NAMESPACE, SamplerPool
    from .worker import train_loop

    m, r = cfg.meta, cfg.runtime
    train_classes = MetaClasses.of(cfg.data.reference, m).train
    started = start_ray(r, local_cpus(r))
    take_signals()
    _warn_if_short(r, min(r.sampler_actors, len(train_classes)))
    tag = f"{Path(m.out).name}-{uuid.uuid4().hex[:8]}"  # actor names unique per launch: a dead launch's may linger
    samplers = SamplerPool.start(cfg, train_classes, tag)
    # The aggregator's only state is on disk and a re-sent version overwrites atomically: safe to restart and retry.
    aggregator = ray.remote(Aggregator).options(name=f"{tag}-aggregator", namespace=NAMESPACE, num_cpus=0,
                                                max_restarts=3, max_task_retries=-1).remote(to_dict(cfg))
    torch_config = (LoopbackTorchConfig if is_local(r) else TorchConfig)(backend="nccl" if r.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "samplers": samplers, "aggregator": aggregator},
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker} | ({"GPU": 1} if r.use_gpu else {})),
        run_config=RunConfig(name="train", storage_path=m.out,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_kept),
                             worker_runtime_env={"env_vars": worker_env(r)}),
    )
    try:
        _run_in_thread(trainer.fit)
    except Exception as e:
        error = _user_error(e)
        if error is None:
            raise
        raise StampError(str(error)) from None
    finally:
        samplers.shutdown()
        ray.kill(aggregator)
        if started:
            ray.shutdown()
