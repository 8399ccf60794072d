"""SLURM for real: the slurm/*.sbatch scripts submitted with `stamp slurm submit` to a live single-node
cluster (tests/slurm/cluster.sh, one per test session), on the toy pipeline of ``tiny_run``.

- meta-training with the Ray backend, then an array job pruning with its generator for two budgets;
- a time limit firing mid-run: USR1 → checkpoint → the job requeues itself → resumes → finishes with
  the generator an uninterrupted run makes (local backend: bit-identical, see docs/SLURM.md for Ray);
- `scontrol requeue` of a running job: the same guarantee, from the last periodic checkpoint.

Where Slurm cannot be installed or started the cluster tests skip, saying why. Every test checks at
teardown that no process of its jobs (batch script, slurmstepd, Ray, stamp) outlived it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import read_jsonl, tiny_config
from stamp_dist.errors import StampError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
# One pytest-xdist worker runs this module: it owns the session's one cluster.
pytestmark = pytest.mark.xdist_group("slurm")
DEMO = ROOT / "configs" / "demo.yaml"


@dataclass
class Cluster:
    dir: Path
    env: dict  # for sbatch/scontrol and the jobs (sbatch exports it): SLURM_CONF, PYTHONPATH, threads


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A live single-node SLURM cluster for the session: started (installed if missing) by cluster.sh, or an
    already running one reused; stopped at the end only if this fixture started it."""
    state = tmp_path_factory.mktemp("slurm_cluster")
    up = subprocess.run(["bash", str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, timeout=120)
        pytest.skip(f"SLURM tests skipped: no SLURM cluster could be started here: {up.stderr.strip()[-500:]}")
    conf = re.search(r"^SLURM_CONF=(.*)$", up.stdout, re.M)
    env = dict(os.environ)
    if conf and conf.group(1):
        env["SLURM_CONF"] = conf.group(1)
    # Jobs run `stamp` and `python -c 'import stamp_dist'` with sbatch's exported environment: make them import
    # this checkout, use one thread each (two jobs share the 2 CI cores) and not contact wandb.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            # a local run stops within one step (~0.3 s here); kill one that hangs well before the time limit
            "STAMP_STOP_GRACE": "15",
            # Ray Train's controller polls workers every 2 s and a checkpointing step waits for it (toy steps here)
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            # Ray renices its workers to 15, which starves them beside the other pytest-xdist worker
            "RAY_worker_niceness": "0"}
    started = (state / "started").read_text().split()
    pidfiles = [state / "run" / f"{d}.pid" for d in ("slurmctld", "slurmd") if d in started]
    pidfiles += [Path("/run/munge/munged.pid")] if "munged" in started else []
    pids = [int(p.read_text()) for p in pidfiles if p.is_file()]
    try:
        yield Cluster(state, env)
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(state)], capture_output=True, timeout=300)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[:1]]
        assert not alive, f"daemons the fixture started are still running after `cluster.sh down`: {alive}"


# --- helpers -----------------------------------------------------------------------------------------


def _write_config(root: Path, name: str, tiny_run: Path, *overrides: str) -> Path:
    """A config file for the jobs: the toy pipeline of ``tiny_run`` with ``meta.out`` = root/name."""
    cfg = tiny_config(tiny_run, f"meta.out={root / name}", "tracking.wandb_mode=disabled",
                      f"tracking.dir={root / 'wandb'}", *overrides)
    path = root / f"{name}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _submit_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stamp_dist.cli", "slurm", "submit", "-c", str(config), *args]


def _job_id(stdout: str) -> int:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, f"no job id in: {stdout}"
    return int(m.group(1))


class Jobs:
    """Submits jobs for one test; at teardown cancels what is left and checks that none of their processes
    survived (found by SLURM_JOB_ID / SLURM_ARRAY_JOB_ID in /proc/*/environ, or `slurmstepd: [ID.`)."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.ids, self.procs = cluster, set(), []

    def start(self, config: Path, *args: str) -> subprocess.Popen:
        """`stamp slurm submit --wait` in the background; the job id is read from its first line."""
        proc = subprocess.Popen(_submit_cmd(config, "--wait", *args), env=self.cluster.env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        if "submitted job" not in first:  # refused: say why
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"`stamp slurm submit` did not submit: {first}{out}{err}")
        proc.job = _job_id(first)  # type: ignore[attr-defined]
        self.ids.add(proc.job)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err

    def run(self, config: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
        return self.finish(self.start(config, *args), timeout)

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.cluster.env, check=True, capture_output=True,
                              text=True).stdout

    def leftovers(self) -> list[str]:
        ids = {str(i) for i in self.ids}
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
            step = re.match(r"slurmstepd: \[(\d+)\.", cmdline)
            if (env.get("SLURM_JOB_ID") in ids or env.get("SLURM_ARRAY_JOB_ID") in ids
                    or (step and step.group(1) in ids)):
                found.append(f"{proc.name}: {cmdline.strip()[:120]}")
        return found

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if not self.ids:
            return
        ids = [str(i) for i in self.ids]
        subprocess.run(["scancel", "--quiet", *ids], env=self.cluster.env, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-o", "%A", "-j", ",".join(ids)], env=self.cluster.env,
                                    capture_output=True, text=True).stdout.split()
            if not queued and not self.leftovers():
                return
            time.sleep(0.5)
        left = self.leftovers()
        assert not left, f"processes of jobs {ids} outlived them: {left}"


@pytest.fixture
def jobs(slurm_cluster):
    j = Jobs(slurm_cluster)
    yield j
    j.close()


def _starts(log: str) -> list[int]:
    """SLURM_RESTART_COUNT of each start of the job, as the script logs it."""
    return [int(n) for n in re.findall(r"^job \d+ start \S+ \(restart (\d+)\)", log, re.M)]


def _resumed_from(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"meta-train: resuming \S+ from step (\d+)", log)]


def _log(run: Path, job: int) -> str:
    return (run / "slurm" / f"stamp-meta-train-{job}.out").read_text()


def _latest_generator(run: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((run / "generators" / "latest.json").read_text())
    return load_file(str(run / "generators" / pointer["version"] / "generator.safetensors"))


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _steps_logged(run: Path) -> list[int]:
    return [line["step"] for line in read_jsonl(run / "metrics.jsonl")]


# --- rendering (no cluster) --------------------------------------------------------------------------


def test_render_takes_header_from_config_and_body_from_template(tiny_run, tmp_path):
    from stamp_dist.slurm import SCRIPT_DIR, prepare

    cfg = tiny_config(tiny_run, f"meta.out={tmp_path / 'run'}", "slurm.time=00:05:00", "slurm.signal_seconds=90",
                      "slurm.cpus_per_task=3", "slurm.gpus_per_node=2", "slurm.partition=gpu", "slurm.nodes=2",
                      "slurm.extra=[--exclusive]")
    sub = prepare(cfg, str(DEMO), ["meta.steps=7"], wait=True)
    head = [line for line in sub.script.splitlines() if line.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=stamp-meta-train", "#SBATCH --partition=gpu", "#SBATCH --nodes=2",
                    "#SBATCH --ntasks-per-node=1", "#SBATCH --time=00:05:00", "#SBATCH --signal=B:USR1@90",
                    "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --cpus-per-task=3",
                    "#SBATCH --gpus-per-node=2", f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out",
                    "#SBATCH --exclusive"]
    # The body is the template's, line for line: only #SBATCH lines differ.
    body = lambda text: [x for x in text.splitlines() if not x.startswith("#SBATCH")]  # noqa: E731
    assert body(sub.script) == body((SCRIPT_DIR / "meta_train.sbatch").read_text())
    assert sub.path.parent == tmp_path / "run" / "slurm"
    assert sub.command == ["sbatch", "--parsable", "--wait", str(sub.path), str(DEMO), "meta.steps=7"]

    target = tiny_run / "data" / "targets" / "digits"
    sub = prepare(cfg, str(DEMO), [], job="prune", data=str(target), budgets=[0.5, 0.25], out=str(tmp_path / "p"))
    assert "#SBATCH --array=0-1" in sub.script and "%x-%A_%a.out" in sub.script
    assert sub.command[-4:] == [str(DEMO), str(target), str(tmp_path / "p"), "0.5,0.25"]
    assert body(sub.script) == body((SCRIPT_DIR / "prune.sbatch").read_text())

    sub = prepare(cfg, str(DEMO), ["bench.seeds=[0]"], job="bench")
    assert "#SBATCH --time=00:05:00" in sub.script and "--requeue" not in sub.script
    assert sub.command[-2:] == [str(DEMO), "bench.seeds=[0]"]


@pytest.mark.parametrize("overrides, args, message", [
    (["slurm.time=tomorrow"], {}, "slurm.time"),
    (["slurm.extra=[exclusive]"], {}, "slurm.extra"),
    (["slurm.time=10"], {}, "slurm.signal_seconds"),  # 600 s: the signal would come at the start
    ([], {"array": "0-3"}, "--array is for prune jobs"),
    ([], {"job": "prune", "budgets": [1.5]}, "budget 1.5"),
    ([], {"job": "bench", "array": "0-1"}, "--array is for prune jobs"),
    ([], {"job": "finetune"}, "unknown SLURM job"),
])
def test_render_rejects_bad_input(tiny_run, tmp_path, overrides, args, message):
    from stamp_dist.slurm import prepare

    cfg = tiny_config(tiny_run, f"meta.out={tmp_path}", *overrides)
    with pytest.raises(StampError, match=re.escape(message)):
        prepare(cfg, str(ROOT / "configs" / "demo.yaml"), [], **args)


def test_slurm_numbers_are_checked_when_the_config_loads(tiny_run, tmp_path):
    with pytest.raises(StampError, match=re.escape("'slurm.nodes' is 0")):
        tiny_config(tiny_run, f"meta.out={tmp_path}", "slurm.nodes=0")


def test_dry_run_prints_and_writes_nothing(tiny_run, tmp_path, capsys):
    from stamp_dist.cli import main

    assert main(["slurm", "submit", "-c", str(ROOT / "configs" / "demo.yaml"), "--dry-run",
                 f"meta.out={tmp_path / 'run'}", "slurm.time=10", "slurm.signal_seconds=60"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=10" in out and "sbatch --parsable" in out
    assert not (tmp_path / "run").exists()


# --- a live cluster ------------------------------------------------------------------------------------

# Bigger episodes than tiny_config's: ~0.3 s per meta-step on one core, so that a signal sent while the run
# goes lands well before its last step.
SLOW_STEPS = ["meta.k_shot=4", "meta.q_query=4", "meta.meta_batch=8", "meta.n_way_min=5", "meta.n_way_max=5",
              "meta.inner_steps=5"]
RAY = ["runtime.backend=ray", "runtime.num_workers=1", "runtime.sampler_actors=1", "runtime.sampler_cpus=0.5",
       "slurm.cpus_per_task=2", "slurm.time=10", "slurm.signal_seconds=30"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_meta_train_stops_on_usr1_requeues_resumes_then_array_prune(slurm_cluster, jobs, tiny_run, tmp_path):
    """sbatch --wait of meta_train.sbatch (Ray head + Ray Train worker on the allocation). Mid-run the batch
    script gets USR1 as at a time limit (`scancel --batch --signal=USR1`, like --signal=B:USR1): the Ray run
    checkpoints and stops, the job requeues itself, the next start resumes at the stopped step and finishes.
    Then one array job prunes for two budgets in parallel with the published generator."""
    steps = 40
    config = _write_config(tmp_path, "ray", tiny_run, f"meta.steps={steps}", "meta.checkpoint_every=5",
                           "meta.val_every=20", *SLOW_STEPS)
    run = tmp_path / "ray"
    t = time.monotonic()
    proc = jobs.start(config, *RAY)
    while len(_steps_logged(run)) < 2:
        assert proc.poll() is None, jobs.finish(proc, 10)[1]
        assert time.monotonic() - t < 300, "the Ray run took no step in 300 s"
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(proc.job)], env=slurm_cluster.env, check=True)
    rc, out = jobs.finish(proc, timeout=420)
    log = _log(run, proc.job)
    print(f"Ray meta-train job, stopped and requeued once: {time.monotonic() - t:.1f} s")
    assert rc == 0, out + log
    assert _starts(log) == [0, 1] and "time limit near" in log and "requeueing" in log, log
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    starts = [(e["step"], e["resumed"]) for e in events if e["event"] == "start"]
    finishes = [(e["step"], e["stopped"]) for e in events if e["event"] == "finish"]
    print(f"Ray run starts (step, resumed): {starts}; finishes (step, stopped): {finishes}")
    (stopped_at, stopped), last = finishes
    assert stopped and 2 <= stopped_at < steps and last == (steps, False)
    assert starts == [(0, False), (stopped_at, True)]  # resumed exactly where it stopped
    assert json.loads((run / "generators" / "latest.json").read_text())["step"] == steps

    from stamp_dist import load_pruned
    from stamp_dist.measure import count_macs_params

    budgets = [0.5, 0.3]
    target, pruned = tiny_run / "data" / "targets" / "digits", tmp_path / "pruned"
    t = time.monotonic()
    rc, out = jobs.run(config, "--job", "prune", "--data", str(target), "--out", str(pruned),
                       *[a for b in budgets for a in ("--budget", str(b))], "slurm.cpus_per_task=1",
                       "slurm.prune_time=5", timeout=300)
    print(f"prune array job (2 tasks): {time.monotonic() - t:.1f} s")
    logs = sorted((run / "slurm").glob("stamp-prune-*_*.out"))
    assert rc == 0, out + "".join(p.read_text() for p in logs)
    assert len(logs) == 2
    spans = []
    for b in budgets:
        model, spec = load_pruned(pruned / f"budget-{b:g}")
        macs, _ = count_macs_params(model, tuple(spec.input_size))  # recounted on the rebuilt model
        ratio = macs / spec.dense_macs
        print(f"budget {b}: MACs ratio {ratio:.4f}")
        assert abs(ratio - b) <= 0.02 * b, (b, ratio)
    for p in logs:  # both tasks ran at the same time
        times = [float(x) for x in re.findall(r"at (\d+\.\d+)", p.read_text())]
        spans.append((min(times), max(times)))
    (s0, e0), (s1, e1) = spans
    assert s0 < e1 and s1 < e0, f"array tasks did not overlap: {spans}"


# The interrupted runs: local backend (resume is bit-identical). SLURM checks time limits every 30 s and sends
# --signal=B:USR1@S at the first check with at least S + 30 s left: with --time=1 --signal=B:USR1@50 that is
# the first check after the job starts, at most 30 s in. The time-limited run must outlast that even on an
# idle machine: ~4 steps/s alone (~3 while the reference job shares the 2 CPUs), so 220 steps take 55-75 s.
# (With 100 steps an idle machine finished in 25 s, before the signal.)
STEPS = 220
# The requeued run is stopped by the test at step 20, so it needs no more steps than that plus a margin.
REQUEUE_STEPS = 60
LOCAL_ARGS = ["runtime.backend=local", "slurm.cpus_per_task=1"]


def _local(steps: int) -> list[str]:
    return [f"meta.steps={steps}", "meta.checkpoint_every=1", "meta.val_every=50", *SLOW_STEPS]


def _reference(cluster: Cluster, tiny_run: Path, root: Path, steps: int):
    """Starts, in the background, the uninterrupted run an interrupted one must reproduce: same config and
    seed, through the same sbatch script. Returns (its run directory once it finished, its jobs)."""
    config = _write_config(root, "straight", tiny_run, *_local(steps))
    j = Jobs(cluster)
    proc = j.start(config, *LOCAL_ARGS, "slurm.time=10", "slurm.signal_seconds=30")
    done: dict = {}

    def result() -> Path:
        if not done:
            rc, out = j.finish(proc, timeout=400)
            assert rc == 0, out + _log(root / "straight", proc.job)
            assert _starts(_log(root / "straight", proc.job)) == [0]
            done["run"] = root / "straight"
        return done["run"]

    return result, j


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tiny_run, tmp_path_factory):
    """The time-limited run's reference (it shares the cluster with that job)."""
    result, j = _reference(slurm_cluster, tiny_run, tmp_path_factory.mktemp("reference"), STEPS)
    yield result
    j.close()


@pytest.fixture(scope="module")
def requeue_reference_run(slurm_cluster, tiny_run, tmp_path_factory):
    """The requeued run's reference (it shares the cluster with that job)."""
    result, j = _reference(slurm_cluster, tiny_run, tmp_path_factory.mktemp("requeue_reference"), REQUEUE_STEPS)
    yield result
    j.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_limit_signal_checkpoints_requeues_and_resumes(reference_run, jobs, tiny_run, tmp_path):
    """--time=1 --signal=B:USR1@50: the signal lands mid-run, the script stops the run (local backend:
    terminate; it checkpoints every step), requeues the job, and the next start resumes where it stopped."""
    config = _write_config(tmp_path, "limited", tiny_run, *_local(STEPS))
    t = time.monotonic()
    rc, out = jobs.run(config, *LOCAL_ARGS, "slurm.time=1", "slurm.signal_seconds=50", timeout=500)
    run = tmp_path / "limited"
    log = _log(run, jobs.procs[-1].job)
    print(f"time-limited job: {time.monotonic() - t:.1f} s\n{log}")
    assert rc == 0, out + log
    starts, resumed = _starts(log), _resumed_from(log)
    print(f"SLURM_RESTART_COUNT per start: {starts}; resumed from steps {resumed}")
    assert starts == list(range(len(starts))) and len(starts) >= 2, log
    assert log.count("time limit near") >= len(starts) - 1
    # Each later start resumed from a step the run had reached (a run stopped before its first checkpoint
    # starts over); the logged steps cover 1..STEPS, those after a checkpoint repeated at most.
    assert any(s > 0 for s in resumed) and len(resumed) <= len(starts) - 1
    steps = _steps_logged(run)
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    diff = _max_abs_diff(_latest_generator(run), _latest_generator(reference_run()))
    print(f"max abs diff resumed vs uninterrupted generator: {diff}")
    assert diff == 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scontrol_requeue_resumes_from_last_checkpoint(requeue_reference_run, jobs, tiny_run, tmp_path):
    """`scontrol requeue` sends SIGTERM to every process of the job (SIGKILL after KillWait): the run stops
    without an orderly checkpoint, SLURM requeues it, and the next start resumes from the last periodic one."""
    config = _write_config(tmp_path, "requeued", tiny_run, *_local(REQUEUE_STEPS))
    run = tmp_path / "requeued"
    proc = jobs.start(config, *LOCAL_ARGS, "slurm.time=10", "slurm.signal_seconds=30")
    t = time.monotonic()
    while max(_steps_logged(run), default=0) < 20:
        assert proc.poll() is None, jobs.finish(proc, 10)[1]
        assert time.monotonic() - t < 300, "the job made no progress"
        time.sleep(0.2)
    at = max(_steps_logged(run))
    jobs.scontrol("requeue", str(proc.job))
    rc, out = jobs.finish(proc, timeout=400)
    log = _log(run, proc.job)
    print(f"requeued job: {time.monotonic() - t:.1f} s after it started training\n{log}")
    assert rc == 0, out + log
    assert _starts(log) == [0, 1] and "DUE TO JOB REQUEUE" in log
    [resumed] = _resumed_from(log)
    print(f"requeued at logged step {at}; resumed from step {resumed}")
    assert at <= resumed < REQUEUE_STEPS
    diff = _max_abs_diff(_latest_generator(run), _latest_generator(requeue_reference_run()))
    print(f"max abs diff requeued vs uninterrupted generator: {diff}")
    assert diff == 0.0
