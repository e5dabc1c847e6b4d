"""Multi-node for real on one machine: two "hosts" (network namespaces joined by a veth pair, each with its own
hostname; launch/netns_hosts.sh), one `megarank launch` agent per host, c10d rendezvous on the first host, gloo
across them. Checked against the same world size on one host: the weights must be bit-identical.

Skips with the reason `netns_hosts.sh check` gives where namespaces are refused (no root, a sandbox without
CAP_NET_ADMIN). Only addresses inside the test's own namespaces are used.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training_harness import TINY, assert_bit_identical, kill_tree, read_plain_tensors, run, run_env

REPO = Path(__file__).resolve().parents[1]
HOSTS = REPO / "launch" / "netns_hosts.sh"
STEPS = 3
TRAIN = [TINY, f"train.steps={STEPS}", "train.log_interval=1", "train.lr_warmup_steps=0"]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    proc = subprocess.run([str(HOSTS), "check"], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "launch/netns_hosts.sh check failed")


@pytest.fixture(scope="module")
def hosts():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 10000
    names = (f"mr{tag}a", f"mr{tag}b")
    subprocess.run([str(HOSTS), "up", *names, f"10.213.{tag % 250}"], check=True, capture_output=True, text=True)
    try:
        yield names
    finally:
        subprocess.run([str(HOSTS), "down", *names], capture_output=True)


def _free_port() -> int:
    with socket.socket() as s:  # any port works inside the fresh namespaces; one free here is free there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_host(host: str, *cmd: str) -> list[str]:
    return [str(HOSTS), "exec", host, *cmd]


def test_two_hosts_train_as_one_world_bit_identical_to_one_host(hosts, tmp_path):
    a, b = hosts
    port = _free_port()
    layout = ["--nnodes", "2", "--nproc", "1", "--master-addr", a, "--master-port", str(port), "--rdzv-id", "mn"]
    procs, logs = {}, {}
    for node in hosts:
        logs[node] = tmp_path / f"{node}.log"
        cmd = on_host(node, sys.executable, "-m", "megarank", "launch", *layout, *TRAIN,
                      f"checkpoint.dir={tmp_path / 'two-hosts'}")
        with open(logs[node], "w") as out:
            procs[node] = subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        codes = {node: p.wait(timeout=300) for node, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_tree(p)
    out = {node: path.read_text() for node, path in logs.items()}
    assert codes == {a: 0, b: 0}, {n: o[-3000:] for n, o in out.items()}
    assert f"--rdzv-endpoint={a}:{port}" in out[b], out[b][-2000:]  # host b joined host a's rendezvous
    assert f"step {STEPS}/{STEPS}" in out[a] and "x 2 devices" in out[a], out[a][-2000:]  # one world of 2

    one = run([sys.executable, "-m", "megarank", "launch", "--nproc", "2", *TRAIN,
               f"checkpoint.dir={tmp_path / 'one-host'}"], cwd=tmp_path, timeout=300)
    assert f"step {STEPS}/{STEPS}" in one.stdout
    assert_bit_identical(read_plain_tensors(tmp_path / "two-hosts" / f"step-{STEPS}" / "model"),
                         read_plain_tensors(tmp_path / "one-host" / f"step-{STEPS}" / "model"),
                         "two hosts x 1 rank vs one host x 2 ranks")
