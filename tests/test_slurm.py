"""launch/slurm on a real SLURM cluster on this machine (launch/slurm/local_cluster.sh): one node on localhost, and
two nodes on two "hosts" made of network namespaces (launch/netns_hosts.sh).

Needs root and Debian's `munge slurm-client slurmctld slurmd`; skips with the reason otherwise. The cluster
(munged, slurmctld, slurmd as plain daemons) lives in a temporary folder on free ports and is stopped by PID
at the end. Every job goes through launch/slurm/train.sbatch with 2 gloo ranks on the tiny config:
  - an all-reduce smoke test (no trainer needed),
  - an uninterrupted run that must exit 0 and leave a checkpoint,
  - a run that gets USR1 like a job near its time limit, saves, requeues itself, resumes from `latest` and
    ends with bit-identical weights to the uninterrupted run;
  - a plain `scancel` (SIGTERM to every process of the step): the trainer saves and the job ends; the same
    sbatch resubmitted resumes and ends with bit-identical weights;
  - two nodes, one rank each (`sbatch --nodes=2`): USR1 -> save -> requeue -> resume, ending bit-identical to the
    uninterrupted one-node run of the same world size.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
STEPS = 6  # each step of the tiny config saves a checkpoint (save_interval=1): ~2-3 s per step on 2 cores
TRAIN_ARGS = ["configs/tiny.yaml", f"train.steps={STEPS}", "train.log_interval=1", "checkpoint.save_interval=1",
              "checkpoint.keep_last=2"]
JOB_TIMEOUT = 300


def _skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: slurmd starts jobs as their user and munged/slurmctld write their own state"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol") if shutil.which(b) is None]
    if missing:
        return (f"SLURM binaries missing ({', '.join(missing)}): apt-get install -y --no-install-recommends "
                "munge slurm-client slurmctld slurmd")
    return None


def _trainer_missing() -> str | None:
    for mod in ("megarank.training", "megarank.training.loop", "megarank.cli"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not importable: the trainer is not there yet"
        except ImportError as e:
            return f"{mod} is not importable ({e})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A started local cluster; yields the environment for sbatch/squeue/scancel and the work folder."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ)
    env.update(
        MEGARANK_SLURM_DIR=str(work / "cluster"),
        MEGARANK_SLURM_CTLD_PORT=str(_free_port()),
        MEGARANK_SLURM_SLURMD_PORT=str(_free_port()),
    )
    start = time.time()
    proc = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}"
        print(f"local SLURM cluster started in {time.time() - start:.1f} s")
        env.update(
            SLURM_CONF=str(work / "cluster" / "slurm.conf"),
            # The job runs this interpreter's environment (the CI venv or the developer's).
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            MEGARANK_LAUNCH=f"{sys.executable} -m megarank.launch",
            MEGARANK_DIR=str(REPO),
            NPROC_PER_NODE="2",
            LOG_DIR=str(work / "rank-logs"),
        )
        yield env, work
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=60)


def _client(*cmd: str) -> list[str]:
    """A SLURM client command where it reaches slurmctld (on the first host in two-node mode)."""
    return [str(CLUSTER), "run", *cmd]


def _sbatch(env, out: Path, name: str, args, wait=True, options=(), **popen):
    cmd = _client("sbatch", "--wait", f"--job-name={name}", f"--output={out}", *options, str(SBATCH_SCRIPT), *args)
    if wait:
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_until_ended(env, job_id: str, timeout: float = 60) -> float:
    """Until no process of the job is left: squeue lists it as COMPLETING (CG) after scancel until slurmd has
    seen every process of every step end (KillWait=30 s at most, then SIGKILL). Returns the seconds waited."""
    start = time.time()
    deadline = start + timeout
    while True:
        proc = subprocess.run(_client("squeue", "-h", "-j", job_id, "-o", "%T"), env=env, capture_output=True,
                              text=True)
        states = proc.stdout.split() if proc.returncode == 0 else []  # an unknown id: purged, so ended
        if not any(s in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED") for s in states):
            return time.time() - start
        assert time.time() < deadline, f"job {job_id} still {states} {timeout:.0f} s after it was cancelled"
        time.sleep(0.2)


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else "(no job output)"


def _same_weights(a: Path, b: Path) -> subprocess.CompletedProcess:
    """Compare two torch_dist model folders tensor by tensor (torch.equal), in a child process because
    dist_checkpointing needs a process group."""
    code = r"""
import sys, torch, torch.distributed as dist
from megatron.core.dist_checkpointing import load_plain_tensors
if __name__ == "__main__":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    a, b = ({k: v for k, v in load_plain_tensors(p).items() if torch.is_tensor(v)} for p in sys.argv[1:3])
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"{len(a)} tensors compared, {len(diff)} differ: {diff}")
    sys.exit(1 if diff or not a else 0)
"""
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(a), str(b)], capture_output=True,
                          text=True, timeout=180)


def test_allreduce_through_train_sbatch(cluster):
    """The sbatch structure alone: one srun task, one torchrun agent, 2 gloo ranks that all-reduce. The job asks
    for 2 tasks per node, which must not start a second agent (world size would be 4)."""
    env, work = cluster
    out = work / "allreduce.out"
    proc = _sbatch(env, out, "allreduce", ["--script", "launch/allreduce_check.py"], options=["--ntasks-per-node=2"])
    log = _log(out)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log}"
    assert "allreduce_check: world 2 backend gloo" in log, log
    assert "allreduce_check: ok" in log, log
    assert "pip freeze" in log and "nodes (1):" in log and "git:" in log, log


@pytest.fixture(scope="module")
def reference_run(cluster):
    """The tiny config trained uninterrupted through train.sbatch (2 gloo ranks, DP=2)."""
    reason = _trainer_missing()
    if reason:
        pytest.skip(reason)
    env, work = cluster
    ckpt, out = work / "ckpt-reference", work / "reference.out"
    start = time.time()
    proc = _sbatch(env, out, "reference", [*TRAIN_ARGS, f"checkpoint.dir={ckpt}"])
    print(f"uninterrupted job took {time.time() - start:.1f} s")
    return proc, ckpt, out


def test_train_sbatch_tiny(reference_run):
    proc, ckpt, out = reference_run
    log = _log(out)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log}"
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS}", log
    assert (ckpt / f"step-{STEPS}" / "model" / "metadata.json").is_file(), log
    assert f"step {STEPS}/{STEPS}" in log, log  # the logging rank's lines reach the job log
    assert "--- pip freeze" in log and "megarank" in log, log
    assert "TP 1 x PP 1 x DP 2" in log, log  # the pre-flight validated the layout
    last = log.strip().splitlines()[-1]  # launch/slurm/job_status.sh: the log's last line says how the job ended
    assert last.endswith(f": FINISHED (latest checkpoint: step {STEPS} ({ckpt}/step-{STEPS}))"), last


def test_preemption_saves_requeues_and_resumes_bit_exact(cluster, reference_run):
    env, work = cluster
    ref_proc, ref_ckpt, _ = reference_run
    assert ref_proc.returncode == 0, "the uninterrupted reference run failed"
    _usr1_preemption_resumes_bit_exact(env, work, ref_ckpt, "preempted")


def _usr1_preemption_resumes_bit_exact(env, work: Path, ref_ckpt: Path, name: str, options=()) -> None:
    ckpt, out = work / f"ckpt-{name}", work / f"{name}.out"
    start = time.time()
    sbatch = _sbatch(env, out, name, [*TRAIN_ARGS, f"checkpoint.dir={ckpt}"], wait=False, options=options)
    try:
        # Preempt mid-run: once the first checkpoint exists, USR1 to the batch shell, as --signal=B:USR1@N does.
        deadline = time.time() + JOB_TIMEOUT
        while not (ckpt / "latest").exists():
            assert sbatch.poll() is None, f"job ended before its first checkpoint:\n{_log(out)}"
            assert time.time() < deadline, f"no checkpoint after {JOB_TIMEOUT} s:\n{_log(out)}"
            time.sleep(0.2)
        job = subprocess.run(_client("squeue", "-h", "-n", name, "-o", "%i"), env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert len(job) == 1, f"expected one '{name}' job, squeue says {job}"
        subprocess.run(_client("scancel", "--signal=USR1", "--batch", job[0]), env=env, check=True)
        signalled = time.time() - start
        output, _ = sbatch.communicate(timeout=JOB_TIMEOUT)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    log = _log(out)
    print(f"USR1 after {signalled:.1f} s; preempted + requeued + resumed job took {time.time() - start:.1f} s")
    assert sbatch.returncode == 0, f"{output}\n{log}"
    assert "USR1: asking the trainer to save and exit" in log, log
    saved = [line for line in log.splitlines() if "preempted: saved step" in line]
    assert saved, f"the trainer did not save on preemption:\n{log}"
    saved_step = int(saved[0].rsplit(" ", 1)[1])
    assert 1 <= saved_step < STEPS, f"preempted at step {saved_step} of {STEPS}: too late to test a resume\n{log}"
    assert f"requeueing job {job[0]}" in log and "restart 1" in log, log
    assert f"megarank job {job[0]}: PREEMPTED at the time-limit warning (USR1); saved and requeued" in log, log
    assert log.strip().splitlines()[-1].startswith(f"=== megarank job {job[0]}: FINISHED (latest checkpoint: step {STEPS}")
    assert f"resumed from {ckpt / f'step-{saved_step}'}" in log, log
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS}", log
    assert not (ckpt / ".save_and_exit").exists()
    cmp = _same_weights(ref_ckpt / f"step-{STEPS}" / "model", ckpt / f"step-{STEPS}" / "model")
    assert cmp.returncode == 0, f"resumed weights differ from the uninterrupted run:\n{cmp.stdout}{cmp.stderr}"


def test_plain_scancel_saves_and_a_resubmit_finishes_bit_exact(cluster, reference_run):
    """`scancel JOB` (SIGTERM to every process of the step, SIGKILL KillWait=30 s later, SLURM's default): the
    trainer saves the step it is in and the job ends unrequeued; the same sbatch again resumes bit-identical."""
    env, work = cluster
    ref_proc, ref_ckpt, _ = reference_run
    assert ref_proc.returncode == 0, "the uninterrupted reference run failed"
    ckpt, out = work / "ckpt-cancelled", work / "cancelled.out"
    sbatch = _sbatch(env, out, "cancelled", [*TRAIN_ARGS, f"checkpoint.dir={ckpt}"], wait=False)
    try:
        deadline = time.time() + JOB_TIMEOUT
        while not (ckpt / "latest").exists():  # after a periodic save: the writer has run in every rank
            assert sbatch.poll() is None, f"job ended before its first checkpoint:\n{_log(out)}"
            assert time.time() < deadline, f"no checkpoint after {JOB_TIMEOUT} s:\n{_log(out)}"
            time.sleep(0.2)
        job = subprocess.run(_client("squeue", "-h", "-n", "cancelled", "-o", "%i"), env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert len(job) == 1, f"expected one 'cancelled' job, squeue says {job}"
        subprocess.run(_client("scancel", job[0]), env=env, check=True)
        output, _ = sbatch.communicate(timeout=JOB_TIMEOUT)
    finally:
        if sbatch.poll() is None:
            sbatch.kill()
    # `sbatch --wait` returns once the job is CANCELLED, while its processes still run (state COMPLETING: the
    # workers finish their step and save within KillWait); only then is every line written.
    print(f"after sbatch --wait returned, the cancelled job's processes ran {_wait_until_ended(env, job[0]):.1f} s more")
    log = _log(out)
    # srun stops relaying the step's output once it is cancelled; every rank's full output is in LOG_DIR.
    ranks = "".join(p.read_text() for p in (work / "rank-logs").glob(f"{job[0]}_*/attempt_*/*/std*.log"))
    saved = [line for line in ranks.splitlines() if "preempted: saved step" in line]
    assert saved, f"the trainer did not save on scancel:\n{output}\n{log}\n{ranks}"
    saved_step = int(saved[0].rsplit(" ", 1)[1])
    assert 1 <= saved_step < STEPS, f"cancelled at step {saved_step} of {STEPS}: too late to test a resume\n{log}"
    assert (ckpt / "latest").read_text().strip() == f"step-{saved_step}", log
    assert "BrokenPipeError" not in log + ranks and "requeueing" not in log, log + ranks
    assert not list(ckpt.glob(".step-*")) and not (ckpt / ".save_and_exit").exists(), sorted(os.listdir(ckpt))

    proc = _sbatch(env, out, "resubmitted", [*TRAIN_ARGS, f"checkpoint.dir={ckpt}"])
    log = _log(out)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log}"
    assert f"resumed from {ckpt / f'step-{saved_step}'}" in log, log
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS}", log
    cmp = _same_weights(ref_ckpt / f"step-{STEPS}" / "model", ckpt / f"step-{STEPS}" / "model")
    assert cmp.returncode == 0, f"resumed weights differ from the uninterrupted run:\n{cmp.stdout}{cmp.stderr}"


# ----------------------------------------------------------------------------------------------- two nodes


def _hosts_reason() -> str | None:
    proc = subprocess.run([str(REPO / "launch" / "netns_hosts.sh"), "check"], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "launch/netns_hosts.sh check failed")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node cluster: slurmctld + slurmd on host a, slurmd on host b (network + UTS namespaces), one rank per
    node; yields the environment and the work folder like `cluster`."""
    reason = _skip_reason() or _trainer_missing() or _hosts_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("slurm2")
    tag = os.getpid() % 10000
    env = dict(os.environ)
    env.update(MEGARANK_SLURM_DIR=str(work / "cluster"), MEGARANK_SLURM_HOSTS=f"mr{tag}n1 mr{tag}n2",
               MEGARANK_SLURM_SUBNET=f"10.214.{tag % 250}")
    proc = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"two-node cluster did not start:\n{proc.stdout}\n{proc.stderr}"
        env.update(SLURM_CONF=str(work / "cluster" / "slurm.conf"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   MEGARANK_LAUNCH=f"{sys.executable} -m megarank.launch", MEGARANK_DIR=str(REPO),
                   NPROC_PER_NODE="1", LOG_DIR=str(work / "rank-logs"))
        yield env, work
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=60)


def test_two_nodes_preempted_and_resumed_end_bit_identical_to_one_node(two_nodes, reference_run):
    """sbatch --nodes=2 (one torchrun agent per host, c10d rendezvous on the first, gloo across hosts), USR1 after
    its first checkpoint -> save -> requeue -> resume: the final weights equal the uninterrupted one-node run of the
    same world size bit for bit (so the two-node run trains like one node, and resumes exactly)."""
    env, work = two_nodes
    one_node_proc, one_node_ckpt, _ = reference_run
    assert one_node_proc.returncode == 0, "the one-node reference run failed"
    _usr1_preemption_resumes_bit_exact(env, work, one_node_ckpt, "two-nodes", options=["--nodes=2"])
    log = _log(work / "two-nodes.out")
    hosts = env["MEGARANK_SLURM_HOSTS"].split()
    assert f"nodes (2): {hosts[0]} {hosts[1]}" in log and f"--rdzv-endpoint={hosts[0]}:" in log, log
