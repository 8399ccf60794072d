"""Distributed meta-training on a real local Ray cluster: 2 sampler actors, 2 DeepSpeed workers (gloo).

One Ray instance serves the test session (``ray_cluster``, in conftest.py). ``faulty_run`` drives `stamp meta-train`
with ``runtime.backend=ray`` three times on one run directory, as a user would, and the tests read
what it left behind (each Ray Train start costs ~20 s, so the assertions share these runs):

A. the command is killed (SIGKILL) after its first checkpoints; before, the listening sockets of its
   training workers are read (all must be on loopback);
B. the same command resumes; a sampler actor and then a training worker are killed mid-run; then
   SIGTERM makes it checkpoint and stop with exit status 75 (stopped, resumable);
C. the same command resumes; Ctrl-C (SIGINT) makes it checkpoint and stop, again with 75;
D. the same command resumes and finishes.
(SIGUSR1, SLURM's pre-timeout signal, takes the same path: tests/test_slurm.py.)
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf

from conftest import read_jsonl, tiny_config
from stamp_dist.errors import EXIT_STOPPED

# The tests using the session's Ray instance run on one pytest-xdist worker: one Ray per test session.
pytestmark = pytest.mark.xdist_group("ray")

STEPS, CHECKPOINT_EVERY, VAL_EVERY = 60, 5, 20


def ray_processes(actor_class: str) -> list[psutil.Process]:
    """Live processes of the session Ray's actors of one class (Ray titles them ``ray::Class...``): only
    descendants of this test process, which started that Ray (another Ray on a shared machine is not ours)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith(f"ray::{actor_class}"):
            found.append(p)
    return found


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll until ``predicate()`` holds. Timeouts are generous on purpose (a wait returns as soon as its
    condition holds): on a loaded 2-core machine, Ray Train start-up plus DeepSpeed's first JIT build
    took phase A over 6 minutes to its first checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def last_step(run: Path) -> int:
    lines = read_jsonl(run / "metrics.jsonl")
    return lines[-1]["step"] if lines else 0


def latest_checkpoint_step(run: Path) -> int:
    """The step of the newest checkpoint Ray Train registered for the run (what a resume starts from)."""
    path = run / "train" / "checkpoint_manager_snapshot.json"
    # Ray Train rewrites this file in place, not by rename: a poll can catch it empty or half-written.
    snapshot = wait_for(lambda: parsed_json(path), 30, f"{path} to parse")
    return max(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


def parsed_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def listening(procs: list[psutil.Process]) -> list[str]:
    """``address:port`` of every listening TCP socket of ``procs``."""
    found = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def is_loopback(address: str) -> bool:
    ip = address.rpartition(":")[0]
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


def kill_and_wait_gone(procs: list[psutil.Process]) -> None:
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(scope="module")
def faulty_run(ray_cluster, tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_run")
    run = tmp / "run"
    cfg = tiny_config(tiny_run, f"meta.out={run}", f"meta.steps={STEPS}", f"meta.val_every={VAL_EVERY}",
                      f"meta.checkpoint_every={CHECKPOINT_EVERY}", "runtime.backend=ray",
                      f"runtime.address={ray_cluster}", "runtime.num_workers=2", "runtime.sampler_actors=2",
                      "runtime.sampler_cpus=0.5", "runtime.max_failures=2", "tracking.wandb_mode=offline",
                      f"tracking.dir={tmp}/wandb")
    OmegaConf.save(cfg, tmp / "run.yaml")
    record = {"tmp": tmp, "run": run, "yaml": tmp / "run.yaml"}

    def command(phase: str) -> subprocess.Popen:
        log = open(tmp / f"phase_{phase}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "stamp_dist.cli", "meta-train", "-c", str(tmp / "run.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp)

    def stopped_by(proc: subprocess.Popen, sig: signal.Signals, phase: str) -> None:
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == EXIT_STOPPED, (tmp / f"phase_{phase}.log").read_text()[-3000:]
        assert "stopped at step" in (tmp / f"phase_{phase}.log").read_text()

    # A: kill the whole command once it has checkpointed.
    t0 = time.monotonic()
    a = command("A")
    wait_for(lambda: (run / "train" / "checkpoint_manager_snapshot.json").is_file() and last_step(run) >= 8,
             600, "phase A to pass step 8", a)
    workers = ray_processes("RayTrainWorker")
    record["worker_sockets"] = listening(workers)
    record["workers_seen"] = len(workers)
    a.kill()
    a.wait()
    record["a_checkpoint"] = latest_checkpoint_step(run)
    record["a_last_step"] = last_step(run)
    # The killed driver's actors die with it; wait so that B's kills hit B's processes.
    wait_for(lambda: not ray_processes("RayTrainWorker") and not ray_processes("SamplerActor"), 60,
             "phase A's actors to exit")
    record["a_seconds"] = time.monotonic() - t0

    # B: resume; kill a sampler actor, then a worker; then ask for a graceful stop.
    t0 = time.monotonic()
    lines = lambda: len(read_jsonl(run / "metrics.jsonl"))  # noqa: E731
    starts = lambda: sum(e["event"] == "start" for e in read_jsonl(run / "events.jsonl"))  # noqa: E731
    lines_after_a = lines()
    b = command("B")
    wait_for(lambda: lines() >= lines_after_a + 3, 600, "phase B to resume and take 3 steps", b)
    samplers = {p.pid for p in ray_processes("SamplerActor")}
    victim = ray_processes("SamplerActor")[0]
    record["sampler_killed_at"], lines_at_kill = last_step(run), lines()
    kill_and_wait_gone([victim])
    wait_for(lambda: lines() >= lines_at_kill + 5, 360, "phase B to go on after the sampler was killed", b)
    record["sampler_replaced"] = wait_for(
        lambda: (pids := {p.pid for p in ray_processes("SamplerActor")}) and victim.pid not in pids
        and len(pids) == len(samplers), 180, "the sampler actor's replacement")
    wait_for(lambda: latest_checkpoint_step(run) > record["a_checkpoint"], 180, "phase B to commit a checkpoint", b)
    starts_before = starts()
    record["worker_killed_at"] = last_step(run)
    record["committed_before_kill"] = latest_checkpoint_step(run)
    kill_and_wait_gone(ray_processes("RayTrainWorker")[:1])
    record["worker_kill_landed"] = last_step(run)  # the group cannot step with a rank missing
    wait_for(lambda: starts() > starts_before, 600, "the restarted worker group to start", b)
    # What Ray Train had committed when it restarted the group (it commits a checkpoint when its
    # controller has collected every rank's report, so the newest upload may not have been committed).
    record["committed_at_restart"] = latest_checkpoint_step(run)
    stopped_by(b, signal.SIGTERM, "B")
    record["b_summary"] = json.loads((run / "summary.json").read_text())
    record["b_seconds"] = time.monotonic() - t0

    # C: resume, then Ctrl-C.
    t0 = time.monotonic()
    c = command("C")
    wait_for(lambda: last_step(run) >= record["b_summary"]["step"] + 2, 600, "phase C to resume and take 2 steps", c)
    stopped_by(c, signal.SIGINT, "C")
    record["c_summary"] = json.loads((run / "summary.json").read_text())
    record["c_seconds"] = time.monotonic() - t0

    # D: the same command finishes the run.
    t0 = time.monotonic()
    d = command("D")
    assert d.wait(timeout=600) == 0, (tmp / "phase_D.log").read_text()[-3000:]
    record["d_seconds"] = time.monotonic() - t0
    record["events"] = read_jsonl(run / "events.jsonl")
    record["summary"] = json.loads((run / "summary.json").read_text())
    print({k: v for k, v in record.items() if k != "events"})
    return record


@pytest.mark.slow
def test_killed_command_resumes_from_its_last_checkpoint(faulty_run):
    starts = [e for e in faulty_run["events"] if e["event"] == "start"]
    assert (starts[0]["step"], starts[0]["resumed"], starts[0]["world_size"]) == (0, False, 2)
    # B's first start is the re-run after the kill: it continues from A's newest checkpoint.
    assert starts[1]["resumed"] and starts[1]["step"] == faulty_run["a_checkpoint"] >= CHECKPOINT_EVERY
    assert faulty_run["a_checkpoint"] <= faulty_run["a_last_step"]


@pytest.mark.slow
def test_killed_sampler_actor_is_replaced_and_the_run_goes_on(faulty_run):
    # The fixture waited for 5 more steps after the kill, and for a new actor process.
    assert faulty_run["sampler_replaced"]
    assert faulty_run["worker_killed_at"] >= faulty_run["sampler_killed_at"] + 5


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(faulty_run):
    starts = [e for e in faulty_run["events"] if e["event"] == "start"]
    restart = starts[2]  # B's second worker group: Ray Train's restart after the worker was killed
    assert restart["resumed"] and restart["step"] == faulty_run["committed_at_restart"]
    assert faulty_run["committed_before_kill"] <= restart["step"] <= faulty_run["worker_kill_landed"]
    assert restart["step"] > starts[1]["step"]  # progress made since B's own start was kept


@pytest.mark.slow
def test_stop_signals_checkpoint_and_the_next_run_finishes(faulty_run):
    """SIGTERM (B) and Ctrl-C (C) each checkpoint at the end of the step and exit 75 (the fixture checks
    the status); the next start resumes exactly there. (Defect 2 of issue 15: SIGTERM ended a Ray run
    through Ray's own handler, rc 1 or -6, without a checkpoint.)"""
    b, c, final = faulty_run["b_summary"], faulty_run["c_summary"], faulty_run["summary"]
    assert b["stopped"] and c["stopped"] and b["step"] < c["step"] < STEPS
    starts = [e["step"] for e in faulty_run["events"] if e["event"] == "start"]
    assert starts[-2:] == [b["step"], c["step"]]  # C resumed where B stopped, D where C stopped
    assert final["step"] == STEPS and not final["stopped"]


@pytest.mark.slow
def test_metrics_hold_every_step_exactly_once(faulty_run):
    """Defect 11 of issue 15: after a SIGKILL, a killed worker, SIGTERM and Ctrl-C, each step is logged once."""
    assert [r["step"] for r in read_jsonl(faulty_run["run"] / "metrics.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_workers_listen_on_loopback_only(faulty_run):
    """Defect 3 of issue 15: rank 0's TCPStore listened on every interface (``*:PORT``)."""
    assert faulty_run["workers_seen"] == 2 and faulty_run["worker_sockets"]
    assert all(is_loopback(a) for a in faulty_run["worker_sockets"]), faulty_run["worker_sockets"]


def _is_pickle(path: Path) -> bool:
    """A pickle (protocol 2+ starts with 0x80) or a torch.save zip (holds ``data.pkl``)."""
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80":
        return True
    if head == b"PK\x03\x04":
        import zipfile

        with zipfile.ZipFile(path) as z:
            return any(n.endswith(".pkl") for n in z.namelist())
    return False


@pytest.mark.slow
def test_run_directory_holds_no_pickle(faulty_run):
    """Defect 1 of issue 15: Ray-backend checkpoints were DeepSpeed pickles loaded with weights_only=False."""
    files = [p for p in faulty_run["run"].rglob("*") if p.is_file()]
    assert any(p.name == "state.safetensors" for p in files)
    assert [p for p in files if _is_pickle(p)] == []


class _Payload:
    """Unpickling this runs a shell command (what the probe planted in a DeepSpeed checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_planted_pickle_in_a_checkpoint_runs_nothing(faulty_run, tmp_path, capsys):
    """The reproduction of defect 1: a crafted ``mp_rank_00_model_states.pt`` in the newest checkpoint.
    Resuming refuses it unread, exits 2 naming the file; its payload never runs."""
    import pickle
    import shutil

    from stamp_dist.cli import main

    run = tmp_path / "run"
    shutil.copytree(faulty_run["run"] / "train", run / "train")
    newest = max(p for p in (run / "train").glob("checkpoint_*") if p.is_dir())
    planted = newest / "engine" / "mp_rank_00_model_states.pt"
    planted.parent.mkdir()
    marker = tmp_path / "payload_ran"
    planted.write_bytes(pickle.dumps(_Payload(marker)))
    assert main(["meta-train", "-c", str(faulty_run["yaml"]), f"meta.out={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(planted) in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_ranks_hold_identical_parameters(faulty_run):
    summary = faulty_run["summary"]
    assert summary["world_size"] == 2 and summary["ranks_identical"]
    assert len(set(summary["rank_fingerprints"])) == 1


@pytest.mark.slow
def test_published_generators_are_complete_and_prune_uses_best(faulty_run, tiny_run):
    from stamp_dist.cli import main
    from stamp_dist.meta.artifact import GeneratorStore, load_generator, resolve

    run = faulty_run["run"]
    store = GeneratorStore(run)
    assert store.pointer("latest")["step"] == STEPS
    versions = sorted(p for p in store.root.glob("v[0-9]*"))
    assert versions and all(load_generator(v).info["step"] == int(v.name[1:]) for v in versions)  # none half-written
    best = resolve(run)
    assert best.name == store.pointer("best")["version"]
    out = faulty_run["tmp"] / "pruned"
    assert main(["prune", "-c", str(faulty_run["yaml"]), "--generator", str(run), "--data",
                 str(tiny_run / "data" / "targets" / "digits"), "--budget", "0.5", "--out", str(out)]) == 0
    spec = json.loads((out / "spec.json").read_text())
    assert spec["report"]["generator"] == str(best)


@pytest.mark.slow
def test_keep_ratio_plots_and_logs(faulty_run):
    run = faulty_run["run"]
    assert (run / "plots" / f"keep_ratio_{STEPS:06d}.png").stat().st_size > 1000
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert {"loss", "ce", "prior", "budget_term", "expected_ratio", "val_acc", "val_macs_ratio",
            "episodes_per_s", "data_wait_fraction"} <= set(last)
    assert 0 < faulty_run["summary"]["episodes_per_s"] and 0 <= faulty_run["summary"]["data_wait_fraction"] < 1


# --- wandb ------------------------------------------------------------------------------------

def read_wandb_records(path: Path) -> list:
    """Records of an offline run file (``run-<id>.wandb``). The file is a 7-byte header (``:W&B``, magic,
    version) followed by a LevelDB-style log: 32 KiB blocks of chunks, each a 7-byte header (CRC32C,
    little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and part of a serialised
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk, records = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def key(item) -> str:
    """A history/config item's name (wandb stores it in ``key`` or, path-split, in ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_keys(faulty_run):
    run_id = (faulty_run["run"] / "wandb_id").read_text().strip()
    files = sorted((faulty_run["tmp"] / "wandb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) >= 3  # one offline run directory per worker-group start, all under the same run id
    records = [r for f in files for r in read_wandb_records(f)]
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "history", "artifact"} <= kinds
    keys = {key(item) for r in records if r.HasField("history") for item in r.history.item}
    assert {"loss", "ce", "prior", "budget_term", "expected_ratio", "query_acc", "val_acc", "val_macs_ratio",
            "episodes_per_s", "data_wait_fraction", "keep_ratio/_type"} <= keys
    images = {json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
              if key(i) == "keep_ratio/_type"}
    assert images == {"image-file"}  # the keep-ratio plot, logged as a wandb.Image
    config = {key(u) for r in records if r.HasField("run") for u in r.run.config.update}
    assert {"meta", "runtime", "tracking"} <= config
    steps = [json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
             if key(i) == "_step"]
    assert max(steps) == STEPS


# --- sampler actors ----------------------------------------------------------------------------

@pytest.mark.slow
def test_sampler_actors_serve_worker_count_independent_episodes(ray_cluster, tiny_run):
    """Two workers' halves of a meta-batch are the whole meta-batch one worker takes — tasks and images —
    and both are what the local backend's in-process pools serve."""
    import ray

    from stamp_dist.data.episodes import ClassPools, EpisodeStream, MetaClasses
    from stamp_dist.distributed.sampler import SamplerPool

    cfg = tiny_config(tiny_run, "runtime.sampler_actors=2", "runtime.sampler_cpus=0.5", "runtime.sampler_buffer=8")
    m = cfg.meta
    classes = MetaClasses.of(cfg.data.reference, m).train
    pool = SamplerPool.start(cfg, classes, "unit")
    try:
        assert sorted(pool.owner) == classes and set(pool.owner.values()) == {0, 1}
        halves = [EpisodeStream(pool, classes, m, first, 2, 2).take(1)[0] for first in (2, 0)]  # rank 1 first
        whole, _ = EpisodeStream(ClassPools(cfg.data.reference, classes, m.seed, cfg.runtime), classes, m, 0, 4,
                                 0).take(1)
        assert [(e.classes, e.budget) for e in whole] == [(e.classes, e.budget) for h in halves[::-1] for e in h]
        assert all(torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
                   for a, b in zip(whole, [e for h in halves[::-1] for e in h]))
        ep = whole[0]
        assert ep.support_x.dtype == torch.uint8 and ep.support_x.shape[0] == ep.n_way * m.k_shot
        assert ep.query_x.shape[0] == ep.n_way * m.q_query and ep.support_y.max() == ep.n_way - 1

        state = pool.state()
        ray.kill(pool.actors[0], no_restart=False)  # the actor restarts with empty buffers
        again, _ = EpisodeStream(pool, classes, m, 0, 4, 0).take(2)
        assert len(again) == 4 and all(e.support_x.dtype == torch.uint8 for e in again)
        pool.restore(state)
        assert pool.state() == state
    finally:
        pool.shutdown()
