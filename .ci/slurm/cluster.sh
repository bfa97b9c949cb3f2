#!/usr/bin/env bash
# A private one-node Slurm cluster for CI: munged + slurmctld + slurmd on this machine, all state
# under $HFLMPI_SLURM_DIR (default /tmp/hflmpi-slurm), nothing written to /etc.
#
#   bash .ci/slurm/cluster.sh start    # install slurm + munge if missing, start, wait for the node
#   bash .ci/slurm/cluster.sh status   # sinfo/squeue of the private cluster
#   bash .ci/slurm/cluster.sh stop     # cancel jobs, kill the daemons by PID, remove the state dir
#   bash .ci/slurm/cluster.sh env      # print `export SLURM_CONF=...` for a shell
#
# `start` prints a line starting with "SKIPPED:" and exits 0 when the cluster cannot be had here
# (not root, no apt-get, the install failed); set HFLMPI_SLURM_REQUIRED=1 to make that an error.
# Clients find the cluster through SLURM_CONF=$HFLMPI_SLURM_DIR/etc/slurm.conf.
#
# The daemons and every slurmstepd carry HFLMPI_SLURM_CLUSTER=$HFLMPI_SLURM_DIR in their
# environment, and so do job processes submitted from an environment that has it (.ci/slurm/run.sh
# sets it for pytest). `stop` cancels the jobs, kills the daemons from their pid files and then any
# leftover process carrying that marker, each by PID, never by name.
set -uo pipefail

DIR=${HFLMPI_SLURM_DIR:-/tmp/hflmpi-slurm}
CTLD_PORT=${HFLMPI_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${HFLMPI_SLURM_SLURMD_PORT:-16818}
NODE=${HFLMPI_SLURM_NODE:-$(hostname -s)}
CPUS=${HFLMPI_SLURM_CPUS:-2}
START_TIMEOUT=${HFLMPI_SLURM_START_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "slurm-cluster: $*" >&2; }

skip() {
    echo "SKIPPED: $*"
    if [[ "${HFLMPI_SLURM_REQUIRED:-0}" == "1" ]]; then
        log "HFLMPI_SLURM_REQUIRED=1: a missing cluster is an error"
        exit 1
    fi
    exit 0
}

have_binaries() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null &&
        command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v sinfo >/dev/null
}

install_packages() {
    have_binaries && return 0
    [[ $(id -u) -eq 0 ]] || skip "slurm/munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || skip "slurm/munge are not installed and there is no apt-get"
    log "installing ${PACKAGES[*]} with apt-get"
    # Keep package scripts from starting the system's munge/slurm services: the cluster starts
    # its own daemons with private files (policy-rc.d is the Debian way; only added if absent).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local ok=1
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/hflmpi-slurm-apt.log" 2>&1; then
        apt-get update -qq >>"${TMPDIR:-/tmp}/hflmpi-slurm-apt.log" 2>&1 &&
            apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
                >>"${TMPDIR:-/tmp}/hflmpi-slurm-apt.log" 2>&1 || ok=0
    fi
    [[ $added_policy -eq 1 ]] && rm -f "$policy"
    if [[ $ok -eq 0 ]] || ! have_binaries; then
        tail -n 5 "${TMPDIR:-/tmp}/hflmpi-slurm-apt.log" >&2
        skip "apt-get install ${PACKAGES[*]} failed (log: ${TMPDIR:-/tmp}/hflmpi-slurm-apt.log)"
    fi
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# The PID from a pid file still belongs to our daemon (its command line names $DIR), not to a
# process that reused the number after the daemon died.
ours() { pid_alive "$1" && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF "$DIR/"; }

read_pid() { [[ -s "$1" ]] && tr -dc '0-9' <"$1"; }

# PIDs of processes whose environment carries this cluster's marker (daemons, slurmstepd, jobs).
marked_pids() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}; pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        if grep -qzxF "HFLMPI_SLURM_CLUSTER=$DIR" "$env" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

write_config() {
    rm -rf "$DIR"
    mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
    chmod 700 "$DIR" "$DIR/munge"
    # A fresh random munge key for this cluster only.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    local mem first_id
    # Job ids start at a random point: MPICH names its init-time shared memory after the PMI
    # job/step id ("JOBID.STEP" under srun), and a segment left in /dev/shm by a killed step is
    # reattached by a later step with the same id (UCX then fails with "failed to unpack address,
    # invalid bandwidth 0.00"). A fresh cluster restarting at job 1 would keep hitting that.
    first_id=$(( ( $(date +%s) * 97 + $$ ) % 60000000 + 1000 ))
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    (( mem > 1024 )) && mem=1024
    cat >"$CONF" <<EOF
# Private one-node test cluster written by .ci/slurm/cluster.sh; removed by 'cluster.sh stop'.
ClusterName=hflmpi-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
FirstJobId=$first_id
# A rank that dies (e.g. in MPI_Init) ends its step instead of leaving the others waiting.
KillOnBadExit=1
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n 1
}

start() {
    if [[ -s "$DIR/run/slurmctld.pid" ]] && pid_alive "$(read_pid "$DIR/run/slurmctld.pid")"; then
        log "a cluster is already running from $DIR; stop it first"
        exit 1
    fi
    [[ $(id -u) -eq 0 ]] || skip "the private cluster runs its daemons as root (SlurmUser=root); not root"
    install_packages
    write_config
    export SLURM_CONF=$CONF HFLMPI_SLURM_CLUSTER=$DIR
    log "starting munged, slurmctld, slurmd (node $NODE, $CPUS CPUs) under $DIR"
    munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || { fail_start "munged did not start"; }
    slurmctld -f "$CONF" -i || fail_start "slurmctld did not start"
    slurmd -f "$CONF" -N "$NODE" || fail_start "slurmd did not start"
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while (( SECONDS < deadline )); do
        state=$(node_state)
        [[ $state == idle ]] && break
        # A node that comes up 'down'/'drain' after an unclean earlier run: resume it.
        if [[ $state == down* || $state == drain* ]]; then
            SLURM_CONF=$CONF scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
        fi
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        fail_start "node $NODE is '${state:-unknown}', not idle, after ${START_TIMEOUT}s"
    fi
    log "cluster up in ${SECONDS}s: SLURM_CONF=$CONF"
    SLURM_CONF=$CONF sinfo >&2
}

fail_start() {
    log "start failed: $*"
    local f
    for f in "$DIR"/log/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
    stop
    exit 1
}

stop() {
    if [[ ! -d $DIR ]]; then
        log "nothing to stop ($DIR does not exist)"
        return 0
    fi
    unset HFLMPI_SLURM_CLUSTER   # so this script's own helpers never match the marker
    local pid name pids
    # Cancel every job first so slurmstepd and the job's processes end cleanly.
    if [[ -f $CONF ]] && pid_alive "$(read_pid "$DIR/run/slurmctld.pid")"; then
        SLURM_CONF=$CONF timeout 10 scancel --quiet --user=root >/dev/null 2>&1
        local deadline=$((SECONDS + 15))
        while (( SECONDS < deadline )); do
            [[ -z $(SLURM_CONF=$CONF timeout 5 squeue -h -t R,CG,S 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    for name in slurmd slurmctld munged; do
        pid=$(read_pid "$DIR/run/$name.pid")
        if ours "$pid"; then
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
            pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null
        fi
    done
    # Leftovers (slurmstepd, job processes) carry the marker in their environment. MPICH's
    # shared-memory segments they map would outlive them: remove exactly those after the kill.
    pids=$(marked_pids)
    if [[ -n $pids ]]; then
        local segments
        segments=$(for pid in $pids; do grep -o '/dev/shm/mpich_shm_[0-9a-f_]*' "/proc/$pid/maps" 2>/dev/null; done | sort -u)
        log "killing leftover processes of this cluster: $(echo $pids)"
        kill -KILL $pids 2>/dev/null
        sleep 0.5
        [[ -n $segments ]] && rm -f $segments
    fi
    rm -rf "$DIR"
    log "stopped; removed $DIR"
}

status() {
    if [[ ! -f $CONF ]]; then echo "no cluster in $DIR"; return 1; fi
    local name
    for name in munged slurmctld slurmd; do
        local pid
        pid=$(read_pid "$DIR/run/$name.pid")
        if pid_alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
    done
    SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
