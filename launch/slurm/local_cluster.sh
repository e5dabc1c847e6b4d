#!/usr/bin/env bash
# A real SLURM cluster on this machine, for development and CI (tests/test_slurm.py): one node on localhost, or
# two nodes on two "hosts" made of network namespaces (launch/netns_hosts.sh) with MEGARANK_SLURM_HOSTS.
#
#   launch/slurm/local_cluster.sh start     # munged + slurmctld + slurmd as plain daemons (no systemd)
#   eval "$(launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/srun/squeue/...
#   launch/slurm/local_cluster.sh run CMD   # run a client command (sbatch, squeue, ...) where it reaches slurmctld
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh stop      # kills the daemons by the PIDs in their pid files (and the hosts)
#
# Two nodes: MEGARANK_SLURM_HOSTS="n1 n2" (MEGARANK_SLURM_SUBNET, default 10.213.8: n1 is .1, n2 is .2) makes
# the two hosts, runs slurmctld and a slurmd on n1 and a slurmd on n2, each in its host's network and with its
# hostname; munged serves both through its socket file. Client commands must then run on a host (`run` does it
# on n1): slurmctld listens on n1's address only.
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
HOSTS_SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/netns_hosts.sh
read -r -a HOSTS <<<"${MEGARANK_SLURM_HOSTS:-}"
SUBNET=${MEGARANK_SLURM_SUBNET:-10.213.8}
if ((${#HOSTS[@]} == 0)); then
    NODES=("$(hostname -s)"); ADDRS=(127.0.0.1)
elif ((${#HOSTS[@]} == 2)); then
    NODES=("${HOSTS[@]}"); ADDRS=("$SUBNET.1" "$SUBNET.2")
else
    echo "local_cluster: MEGARANK_SLURM_HOSTS must name two hosts (got '${MEGARANK_SLURM_HOSTS}')" >&2; exit 2
fi
NODE=${NODES[0]}
CONF=$DIR/slurm.conf

log() { echo "local_cluster: $*" >&2; }

# Daemons by pid-file name, in stop order: compute daemons first, munge last.
daemons() { local n; for n in "${NODES[@]}"; do echo "slurmd-$n"; done; echo slurmctld; echo munged; }

on_node() {  # on_node I CMD...: run CMD on node I (in its host's namespaces in two-node mode)
    local i=$1
    shift
    if ((${#HOSTS[@]} == 0)); then "$@"; else "$HOSTS_SCRIPT" exec "${NODES[$i]}" "$@"; fi
}

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
SlurmctldHost=$NODE(${ADDRS[0]})
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
EOF
    local i
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

wait_idle() {  # every node must reach idle (or mixed/allocated if jobs were left) within 60 s
    local node state=""
    for node in "${NODES[@]}"; do
        for _ in $(seq 120); do
            state=$(SLURM_CONF=$CONF on_node 0 sinfo -h -n "$node" -o %T 2>/dev/null || true)
            case $state in idle|mixed|allocated) log "node $node is $state"; continue 2 ;; esac
            sleep 0.5
        done
        log "node $node did not become idle (state '${state}'); logs in $DIR/log"
        tail -n 20 "$DIR"/log/*.log >&2 || true
        return 1
    done
}

start() {
    [[ $EUID -eq 0 ]] || { log "must run as root (slurmd starts jobs as their user)"; return 1; }
    for bin in munged slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || { log "$bin not found: apt-get install -y --no-install-recommends munge slurm-client slurmctld slurmd"; return 1; }
    done
    if [[ -n $(pid_of slurmctld) ]]; then log "already running in $DIR"; return 0; fi
    stop_daemons
    if ((${#HOSTS[@]})); then
        "$HOSTS_SCRIPT" check || return 1
        "$HOSTS_SCRIPT" up "${NODES[@]}" "$SUBNET" || return 1
    fi
    write_config
    local i
    for i in "${!NODES[@]}"; do mkdir -p "$DIR/spool/${NODES[$i]}"; done
    # Our own munge key, so nothing depends on /etc/munge; munged refuses keys others can read.
    [[ -s $DIR/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none; chmod 400 "$DIR/munge.key"; }
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed"
    SLURM_CONF=$CONF on_node 0 slurmctld -c   # -c: forget jobs of a previous run of this cluster
    for i in "${!NODES[@]}"; do SLURM_CONF=$CONF on_node "$i" slurmd -N "${NODES[$i]}"; done
    wait_idle
    log "started in $DIR; run: export SLURM_CONF=$CONF"
}

stop_daemons() {
    local pid name
    for name in $(daemons); do
        pid=$(pid_of "$name")
        [[ -n $pid ]] || continue
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
        rm -f "$DIR/$name.pid"
        log "stopped $name ($pid)"
    done
    if ((${#HOSTS[@]})); then "$HOSTS_SCRIPT" down "${NODES[@]}"; fi
}

status() {
    local name pid rc=0
    for name in $(daemons); do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then echo "$name running (pid $pid)"; else echo "$name not running"; rc=1; fi
    done
    if [[ $rc -eq 0 ]]; then SLURM_CONF=$CONF on_node 0 sinfo; fi
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    run) shift; SLURM_CONF=$CONF on_node 0 "$@" ;;
    *) echo "usage: $0 start|stop|status|env|run CMD   (state in \$MEGARANK_SLURM_DIR, now $DIR)" >&2; exit 2 ;;
esac
