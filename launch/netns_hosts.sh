#!/usr/bin/env bash
# Two "hosts" on one Linux machine, for multi-node tests (tests/test_multinode.py, local_cluster.sh two-node mode):
# two network namespaces joined by a veth pair, each with its own address and, when a command runs in it, its own
# hostname (a UTS namespace) that both hosts resolve (/etc/netns/<ns>/hosts, bind-mounted over /etc/hosts in a
# mount namespace of the command's own). Only addresses inside these namespaces are used; nothing outside them is addressed or changed.
#
#   launch/netns_hosts.sh up NAME1 NAME2 [SUBNET]   # e.g. up mr-a mr-b 10.213.7 -> mr-a 10.213.7.1, mr-b 10.213.7.2
#   launch/netns_hosts.sh exec NAME CMD [ARGS...]   # run CMD on host NAME (its network, its hostname)
#   launch/netns_hosts.sh down NAME1 NAME2          # delete both namespaces and their /etc/netns files
#   launch/netns_hosts.sh check                     # exit 0 if namespaces can be made here, else say why
#
# The namespaces share everything else with the machine (files, processes, users): a checkpoint folder is a
# "shared filesystem" as on a cluster. Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 and util-linux.
set -euo pipefail

die() { echo "netns_hosts: $*" >&2; exit 2; }

up() {
    local a=$1 b=$2 subnet=${3:-10.213.7}
    [[ $a != "$b" ]] || die "two different names are needed"
    ip netns add "$a"
    ip netns add "$b" || { ip netns del "$a"; die "cannot add namespace $b"; }
    # veth names are limited to 15 characters; the pair is moved into the namespaces at once
    ip link add "v-$$-a" type veth peer name "v-$$-b"
    ip link set "v-$$-a" netns "$a"
    ip link set "v-$$-b" netns "$b"
    local i=1 ns dev
    for ns in "$a" "$b"; do
        dev=$([[ $ns == "$a" ]] && echo "v-$$-a" || echo "v-$$-b")
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$subnet.$i/24" dev "$dev"
        ip -n "$ns" link set "$dev" up
        mkdir -p "/etc/netns/$ns"
        printf '127.0.0.1 localhost\n%s.1 %s\n%s.2 %s\n' "$subnet" "$a" "$subnet" "$b" >"/etc/netns/$ns/hosts"
        i=$((i + 1))
    done
}

down() {
    local ns
    for ns in "$@"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/${ns:?}"
    done
}

run_on() {
    local ns=$1
    shift
    # The host's network (nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup hierarchy slurmd
    # needs), its own hostname (a UTS namespace: what SLURM and torchrun report) and its hosts file (bind-mounted in
    # a private mount namespace, as `ip netns exec` would).
    # shellcheck disable=SC2016  # expanded by the inner sh
    exec nsenter --net="/var/run/netns/$ns" unshare --uts --mount --propagation private \
        sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$ns" "$@"
}

check() {
    [[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
    command -v ip >/dev/null || die "needs iproute2 (ip)"
    command -v unshare >/dev/null || die "needs util-linux (unshare)"
    local probe="mr-probe-$$"
    ip netns add "$probe" 2>/dev/null || die "cannot create a network namespace here (ip netns add refused)"
    if ! nsenter --net="/var/run/netns/$probe" unshare --uts --mount true 2>/dev/null; then
        ip netns del "$probe"; die "cannot enter a network namespace with UTS and mount namespaces here (nsenter/unshare refused)"
    fi
    if ! ip link add "vp-$$-a" type veth peer name "vp-$$-b" 2>/dev/null; then
        ip netns del "$probe"; die "cannot create a veth pair here (ip link add type veth refused)"
    fi
    ip link del "vp-$$-a" 2>/dev/null || true
    ip netns del "$probe"
}

case ${1:-} in
    up) shift; [[ $# -ge 2 ]] || die "usage: up NAME1 NAME2 [SUBNET]"; up "$@" ;;
    down) shift; down "$@" ;;
    exec) shift; [[ $# -ge 2 ]] || die "usage: exec NAME CMD [ARGS...]"; run_on "$@" ;;
    check) check ;;
    *) die "usage: $0 up|down|exec|check ..." ;;
esac
