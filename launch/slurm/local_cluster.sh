#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for development and CI (tests/test_slurm.py).
#
#   launch/slurm/local_cluster.sh start     # munged + slurmctld + slurmd as plain daemons (no systemd)
#   eval "$(launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/srun/squeue/...
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh stop      # kills the three daemons by the PIDs in their pid files
#
# Needs root and Debian's packages:
#   apt-get install -y --no-install-recommends munge slurm-client slurmctld slurmd
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives under
# $MEGARANK_SLURM_DIR (default ${TMPDIR:-/tmp}/megarank-slurm); nothing in /etc is touched.
# Settings that matter and why:
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none  no cgroups needed (containers, gVisor)
#   MinJobAge=5                      finished jobs leave squeue quickly (0 is refused by slurmctld)
#   KillWait=30                      SLURM's default SIGTERM-to-SIGKILL grace, which a cancelled run saves in
#   AuthInfo=cred_expire=10          a requeued job may restart after 10 s instead of the default 120 s
#   SchedulerParameters=sched_interval=2,bf_interval=2   ...and is picked up within 2 s
#   SlurmdParameters=config_overrides  the node uses CPUs/RealMemory as written here, never drained for a
#                                    mismatch with what slurmd detects
set -euo pipefail

DIR=${MEGARANK_SLURM_DIR:-${TMPDIR:-/tmp}/megarank-slurm}
CTLD_PORT=${MEGARANK_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${MEGARANK_SLURM_SLURMD_PORT:-6818}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld munged)   # stop order: compute daemon first, munge last

log() { echo "local_cluster: $*" >&2; }

pid_of() {  # prints the PID of a running daemon, or nothing
    local f=$DIR/$1.pid pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

write_config() {
    local mem_mb
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log}
    chmod 700 "$DIR"
    cat >"$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh; regenerated on every start.
ClusterName=megarank-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=5
KillWait=30
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {  # the node must reach idle (or mixed/allocated if jobs were left) within 60 s
    local state=""
    for _ in $(seq 120); do
        state=$(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
        case $state in idle|mixed|allocated) log "node $NODE is $state"; return 0 ;; esac
        sleep 0.5
    done
    log "node $NODE did not become idle (state '${state}'); logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

start() {
    [[ $EUID -eq 0 ]] || { log "must run as root (slurmd starts jobs as their user)"; return 1; }
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || { log "$bin not found: apt-get install -y --no-install-recommends munge slurm-client slurmctld slurmd"; return 1; }
    done
    if [[ -n $(pid_of slurmctld) ]]; then log "already running in $DIR"; return 0; fi
    stop_daemons
    write_config
    # Our own munge key, so nothing depends on /etc/munge; munged refuses keys others can read.
    [[ -s $DIR/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none; chmod 400 "$DIR/munge.key"; }
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed"
    SLURM_CONF=$CONF slurmctld -c   # -c: forget jobs of a previous run of this cluster
    SLURM_CONF=$CONF slurmd -N "$NODE"
    wait_idle
    log "started in $DIR; run: export SLURM_CONF=$CONF"
}

stop_daemons() {
    local pid name
    for name in "${DAEMONS[@]}"; do
        pid=$(pid_of "$name")
        [[ -n $pid ]] || continue
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
        rm -f "$DIR/$name.pid"
        log "stopped $name ($pid)"
    done
}

status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then echo "$name running (pid $pid)"; else echo "$name not running"; rc=1; fi
    done
    if [[ $rc -eq 0 ]]; then SLURM_CONF=$CONF sinfo; fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state in \$MEGARANK_SLURM_DIR, now $DIR)" >&2; exit 2 ;;
esac
