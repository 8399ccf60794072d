"""`stamp slurm submit`: render a job's #SBATCH header from the config and hand the script to ``sbatch``.

The script bodies live in ``slurm/*.sbatch`` and nowhere else: rendering keeps a template's text and
only replaces its ``#SBATCH`` lines (the defaults for a plain ``sbatch slurm/X.sbatch``) by lines made
from the ``slurm`` config section. The rendered script is written as ``<job>-<time>-<pid>.sbatch``
under ``slurm.output`` (by default ``<meta.out>/slurm``), next to the job logs, so what ran stays on
record; ``--dry-run`` prints it and the ``sbatch`` command instead. Preemption and requeue: docs/SLURM.md.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .atomic import atomic_file
from .config import SlurmConfig, StampConfig
from .errors import StampError

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "slurm"
JOBS = {"meta-train": "meta_train.sbatch", "prune": "prune.sbatch", "bench": "bench.sbatch"}
_SBATCH = re.compile(r"^#SBATCH\b")
# [DD-]HH:MM:SS, [DD-]HH[:MM], MM[:SS], or UNLIMITED (sbatch --time)
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")


@dataclass
class Submission:
    """What ``submit`` does: the rendered script, where it goes, and the ``sbatch`` command line."""

    script: str
    path: Path
    command: list[str]


def template(job: str, script_dir: Path = SCRIPT_DIR) -> str:
    if job not in JOBS:
        raise StampError(f"unknown SLURM job '{job}'; valid jobs: {', '.join(JOBS)}")
    path = script_dir / JOBS[job]
    if not path.is_file():
        raise StampError(f"SLURM script {path} not found: `stamp slurm submit` needs the repository's slurm/ "
                         "directory (install with `pip install -e .` from a clone)")
    return path.read_text()


def time_limit_seconds(value: str) -> int | None:
    """sbatch's --time in seconds (None: unlimited): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if value in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], (parts + [0])[1])
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def _check(s: SlurmConfig) -> None:
    for key in ("partition", "account", "qos", "mem", "time", "prune_time", "output"):
        value = getattr(s, key)
        if value is not None and (not str(value) or re.search(r"\s", str(value))):
            raise StampError(f"config key 'slurm.{key}' is {value!r}; it must be non-empty and without spaces")
    for key in ("time", "prune_time"):
        if not _TIME.match(getattr(s, key)):
            raise StampError(f"config key 'slurm.{key}' is {getattr(s, key)!r}; use sbatch's --time format, "
                             "e.g. 24:00:00, 2-00:00:00 or 30 (minutes)")
    limit = time_limit_seconds(s.time)
    if limit is not None and s.signal_seconds >= limit:
        raise StampError(f"config key 'slurm.signal_seconds' is {s.signal_seconds} but the time limit slurm.time="
                         f"{s.time} is only {limit} s: the checkpoint signal would come at the start; lower it")
    for arg in s.extra:
        if not arg.startswith("-") or "\n" in arg:
            raise StampError(f"config key 'slurm.extra' has {arg!r}; each entry is one sbatch option such as "
                             "--constraint=a100")


def header(job: str, s: SlurmConfig, array: str | None = None) -> list[str]:
    """The ``#SBATCH`` lines of ``job`` from the ``slurm`` section (and the array spec, if any)."""
    _check(s)
    opts = [f"--job-name=stamp-{job}"]
    opts += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos)) if v]
    if job == "meta-train":
        # One task per node (Ray head / Ray worker); requeue with the log appended across starts.
        opts += [f"--nodes={s.nodes}", "--ntasks-per-node=1", f"--time={s.time}",
                 f"--signal=B:USR1@{s.signal_seconds}", "--requeue", "--open-mode=append"]
    elif job == "bench":  # one node; finished cells are cached, so a re-submission goes on where it stopped
        opts += ["--nodes=1", "--ntasks=1", f"--time={s.time}"]
    else:
        opts += ["--nodes=1", "--ntasks=1", f"--time={s.prune_time}"]
    if s.cpus_per_task:
        opts.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.mem:
        opts.append(f"--mem={s.mem}")
    if array:
        opts.append(f"--array={array}")
    # %x job name, %j job id (%A_%a for an array task). Job ids restart at 1 when a cluster's state is wiped.
    log = "%x-%A_%a.out" if array else "%x-%j.out"
    opts.append(f"--output={Path(s.output).resolve() / log}")
    opts += list(s.extra)
    return [f"#SBATCH {o}" for o in opts]


def render(text: str, lines: Sequence[str]) -> str:
    """``text`` with its ``#SBATCH`` lines replaced by ``lines``, placed where its first one was."""
    out, placed = [], False
    for line in text.splitlines():
        if _SBATCH.match(line):
            if not placed:
                out.extend(lines)
                placed = True
            continue
        out.append(line)
    if not placed:
        raise StampError("the SLURM template has no #SBATCH lines to replace; restore it from the repository")
    return "\n".join(out) + "\n"


def script_args(job: str, cfg: StampConfig, config_path: str, overrides: Sequence[str], data: str | None,
                budgets: Sequence[float], out: str | None) -> list[str]:
    """The arguments the job script takes (see the usage line at the top of each slurm/*.sbatch)."""
    config = str(Path(config_path).resolve())
    if job in ("meta-train", "bench"):
        return [config, *overrides]
    data = data or (cfg.bench.targets[0] if cfg.bench.targets else None)
    if not data:
        raise StampError("a prune job needs a target dataset: pass --data DIR")
    for b in budgets:
        if not 0 < b <= 1:
            raise StampError(f"budget {b} is not in (0, 1]: pass --budget with a fraction of the dense MACs")
    out = out or str(Path(cfg.meta.out) / "pruned" / Path(data).name)
    return [config, str(Path(data).resolve()), str(Path(out).resolve()), ",".join(f"{b:g}" for b in budgets),
            *overrides]


def prepare(cfg: StampConfig, config_path: str | None, overrides: Sequence[str], job: str = "meta-train",
            array: str | None = None, wait: bool = False, data: str | None = None,
            budgets: Sequence[float] = (), out: str | None = None) -> Submission:
    """Render the script for ``job`` and build the ``sbatch`` command; nothing is written or run."""
    if config_path is None:
        raise StampError("`stamp slurm submit` needs -c CONFIG: the job reads the same config file")
    if job in ("meta-train", "bench"):
        if array:
            raise StampError(f"--array is for prune jobs; a {job} run is one job")
        if budgets or data or out:
            raise StampError("--budget, --data and --out are for --job prune")
    else:
        budgets = list(budgets) or [cfg.prune.budget]
        if array is None and len(budgets) > 1:
            array = f"0-{len(budgets) - 1}"  # one array task per budget, in parallel
    args = script_args(job, cfg, config_path, overrides, data, budgets, out)
    script = render(template(job), header(job, cfg.slurm, array))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.slurm.output).resolve() / f"{job}-{stamp}-{os.getpid()}.sbatch"  # never overwrites another
    command = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(path), *args]
    return Submission(script, path, command)


def submit(sub: Submission, dry_run: bool = False) -> int:
    """Write the script and run ``sbatch``; returns sbatch's exit status (with ``--wait``: the job's)."""
    if dry_run:
        print(sub.script, end="")
        print(f"# would write {sub.path} and run:\n{shlex.join(sub.command)}")
        return 0
    if shutil.which("sbatch") is None:
        raise StampError("sbatch not found: submit from a SLURM login node (or preview with --dry-run)")
    with atomic_file(sub.path) as tmp:
        tmp.write_text(sub.script)
    # The job id comes first (--parsable); with --wait sbatch then blocks until the job (every array task) ends.
    proc = subprocess.Popen(sub.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if first:
        print(f"submitted job {first.split(';')[0]} ({sub.path})", flush=True)
    rest, err = proc.communicate()
    if rest.strip():
        print(rest.strip())
    if proc.returncode and not first:
        raise StampError(f"sbatch refused the job: {err.strip() or 'no message'} (script: {sub.path})")
    if err.strip():
        print(err.strip(), file=sys.stderr)
    return proc.returncode
