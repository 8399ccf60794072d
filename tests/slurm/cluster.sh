#!/bin/bash
# A throw-away single-node SLURM cluster for the tests (see ../../../shared/SLURM_NOTES.md for the facts used).
#
#   tests/slurm/cluster.sh up DIR     install Slurm + munge if missing, start them, wait for an idle node
#   tests/slurm/cluster.sh down DIR   stop exactly what `up DIR` started
#
# `up` prints `SLURM_CONF=<path>` for a cluster it started (its slurm.conf, state, spool and logs live in
# DIR: the machine's /etc/slurm is left alone) or `SLURM_CONF=` when it found a slurmctld already answering,
# which it then reuses and never stops. It exits 3, saying why on stderr, when Slurm cannot be installed or
# started here; the tests then skip with that message. What it started is listed in DIR/started.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 3; }

up() {
    local dir=$1
    mkdir -p "${dir}"/{state,spool,run,log}
    : >"${dir}/started"

    # A cluster that already answers (its config in /etc/slurm) is reused as it is.
    if command -v scontrol >/dev/null 2>&1 && [[ -f /etc/slurm/slurm.conf ]] &&
        timeout 10 env -u SLURM_CONF scontrol ping 2>/dev/null | grep -q 'is UP'; then
        echo "SLURM_CONF="
        return
    fi

    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
        ! command -v munged >/dev/null; then
        [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root (apt-get)"
        command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
        echo "cluster.sh: installing slurmctld slurmd slurm-client munge" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >"${dir}/log/apt.log" 2>&1 ||
            die "apt-get install slurmctld slurmd slurm-client munge failed (log: ${dir}/log/apt.log)"
    fi
    # SlurmUser=root below: a non-root user cannot run the daemons this way.
    [[ $(id -u) == 0 ]] || die "starting slurmctld/slurmd for the tests needs root"

    # munge: reuse a running munged, else start one (systemd would create /run/munge; nobody does here).
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null 2>&1 ||
            die "no /etc/munge/munge.key and mungekey could not make one"
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged || die "munged did not start"
        echo munged >>"${dir}/started"
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge >/dev/null 2>&1 || die "munge does not work after starting munged"
    fi

    local node cpus mem_mb conf=${dir}/slurm.conf
    node=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    # The last block (JobCompType .. KillWait) is CI tuning: quick scheduling, quick requeue, quick --wait polls.
    cat >"${conf}" <<CONF
ClusterName=stampci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${dir}/log/jobcomp.log
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_interval=2
MinJobAge=5
AuthInfo=cred_expire=5
KillWait=5
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=${conf}
    slurmctld || die "slurmctld did not start (log: ${dir}/log/slurmctld.log)"
    echo slurmctld >>"${dir}/started"
    slurmd || die "slurmd did not start (log: ${dir}/log/slurmd.log)"
    echo slurmd >>"${dir}/started"
    local state=
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o %t 2>/dev/null || true)
        [[ ${state} == idle ]] && break
        sleep 0.2
    done
    [[ ${state} == idle ]] || die "the node did not become idle within 30 s (state '${state}'; logs in ${dir}/log)"
    echo "SLURM_CONF=${conf}"
}

# Wait up to $2 tenths of a second for the process in pid file $1 to end; then kill it.
stop_pidfile() {
    local pidfile=$1 pid
    [[ -s ${pidfile} ]] || return 0
    pid=$(cat "${pidfile}")
    for _ in $(seq "$2"); do kill -0 "${pid}" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "${pid}" 2>/dev/null || true
}

down() {
    local dir=$1
    [[ -f ${dir}/started ]] || return 0
    export SLURM_CONF=${dir}/slurm.conf
    if grep -qx slurmctld "${dir}/started"; then
        # Every job on a cluster we started is ours: cancel what is left, so no slurmstepd outlives the cluster.
        local jobs
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
        if ((${#jobs[@]})); then scancel --full --quiet "${jobs[@]}" 2>/dev/null || true; fi
        for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
        scontrol shutdown >/dev/null 2>&1 || true
        stop_pidfile "${dir}/run/slurmctld.pid" 100
        stop_pidfile "${dir}/run/slurmd.pid" 100
    fi
    if grep -qx munged "${dir}/started"; then
        if [[ -s /run/munge/munged.pid ]]; then
            local munged_pid
            munged_pid=$(cat /run/munge/munged.pid)
            kill "${munged_pid}" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "${munged_pid}" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "${munged_pid}" 2>/dev/null || true
        fi
    fi
    : >"${dir}/started"
}

case ${1:-} in
    up) up "${2:?usage: cluster.sh up DIR}" ;;
    down) down "${2:?usage: cluster.sh down DIR}" ;;
    *) echo "usage: cluster.sh up|down DIR" >&2; exit 2 ;;
esac
