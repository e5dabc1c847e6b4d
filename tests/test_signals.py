"""Real signals to real torchrun jobs (gloo, fp32, the tiny config, a few steps): what an operator does.

- SIGTERM to the torchrun agent after a periodic save (what `scancel`, a node drain or `kill` does): the
  agent forwards it with killpg to every worker's process group; the workers save the next step boundary
  and exit inside the agent's grace period; resuming finishes bit-identical to an uninterrupted run
  (DP=2 with the distributed optimizer, and 1 rank without it).
- SIGKILL of the agent: its workers (in sessions of their own) notice within a second and end without
  writing; nothing in the checkpoint folder changes afterwards.
- A second run on the folder of a live run is refused with one line naming the folder and the holder;
  after the SIGKILL the lock is free.
- Ctrl-C (SIGINT to the process group, as a terminal sends it) to a one-process `megarank train` and to a
  2-rank `megarank launch`: the next step boundary is saved, one line says which step and where, exit 130,
  and resuming finishes bit-identical to the uninterrupted runs above. A second Ctrl-C stops at once, unsaved,
  in one line. Ctrl-C to `megarank evaluate --out` prints one line, exit 130, and leaves no partial run file.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.training_harness import (CRANFIELD, TINY, assert_bit_identical, kill_tree, log_lines, read_plain_tensors,
                                    run, run_env, train_cmd, wait_for)

STEPS, SAVE = 12, 2
ARGS = [f"train.steps={STEPS}", f"checkpoint.save_interval={SAVE}", "checkpoint.keep_last=0", "train.log_interval=1"]
LAYOUTS = {
    "dp2-distributed-optimizer": (2, ["parallel.use_distributed_optimizer=true"]),
    "1-rank": (1, ["parallel.use_distributed_optimizer=false"]),
}
GRACE_S = 30  # torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT (its default), set explicitly for these runs


def torchrun(nproc: int, *overrides: str) -> list[str]:
    """`megarank train` under a real torchrun agent, also for one rank (the agent is what gets the signals)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megarank", "train", TINY, *overrides]


def _env() -> dict:
    return run_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE_S))


def _as_a_foreground_job() -> None:
    """In the child before exec: SIGINT at its default, as a terminal's foreground job has it. A test run started
    in the background of a non-interactive shell (``pytest ... &``) inherits SIGINT ignored, and Python then keeps it
    ignored (no KeyboardInterrupt): the commands that rely on Python's default handling would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _latest(run_dir: Path) -> str:
    try:
        return (run_dir / "latest").read_text().strip()
    except FileNotFoundError:
        return ""


def _start(cmd: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _final(run_dir: Path, part: str) -> dict:
    return read_plain_tensors(run_dir / f"step-{STEPS}" / part)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each layout trained STEPS steps without interruption."""
    work = tmp_path_factory.mktemp("straight")
    for name, (nproc, extra) in LAYOUTS.items():
        run(torchrun(nproc, *ARGS, *extra, f"checkpoint.dir={work / name}"), cwd=work, env=_env())
    return work


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigterm_to_the_agent_saves_the_next_step_and_resumes_bit_identical(straight, tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    run_dir, log_path = tmp_path / "run", tmp_path / "sigterm.log"
    proc = _start(torchrun(nproc, *ARGS, *extra, f"checkpoint.dir={run_dir}"), tmp_path, log_path)
    try:
        # After a periodic save: the process group then already held megatron's checkpoint writer.
        wait_for(lambda: _latest(run_dir) == f"step-{SAVE}", 240, f"the step-{SAVE} save", proc)
        sent = time.monotonic()
        proc.terminate()  # SIGTERM to the agent, as scancel / kill would
        proc.wait(timeout=GRACE_S + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    out = log_path.read_text()
    assert "preempted: saved step" in out, out[-4000:]
    stop = int(out.split("preempted: saved step ", 1)[1].split()[0])
    print(f"{layout}: SIGTERM after the step-{SAVE} save; saved step {stop}; torchrun exited {took:.1f}s later")
    assert SAVE < stop < STEPS, f"stopped at step {stop}"
    assert _latest(run_dir) == f"step-{stop}" and (run_dir / f"step-{stop}" / "megarank_checkpoint.json").is_file()
    assert not list(run_dir.glob(".step-*")), "the SIGTERM save left an incomplete folder"
    assert took < GRACE_S and "Unable to shutdown process" not in out, f"{took:.1f}s:\n{out[-3000:]}"
    assert "BrokenPipeError" not in out and "Traceback" not in out.split("Received 15 death signal")[0]

    resumed = run(torchrun(nproc, *ARGS, *extra, f"checkpoint.dir={run_dir}"), cwd=tmp_path, env=_env()).stdout
    assert f"resumed from {run_dir / f'step-{stop}'} at step {stop}" in resumed
    for part in ("model", "optimizer"):
        assert_bit_identical(_final(straight / layout, part), _final(run_dir, part), f"{layout} {part}")


def _snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its mtime and size (``latest``'s content included)."""
    snap = {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    snap["latest:content"] = _latest(folder)
    return snap


def _alive(procs: list[psutil.Process]) -> list[int]:
    """The processes not yet ended. A zombie leader whose other threads are still exiting still holds its
    files (and so its flock) -- the kernel closes them when the last thread goes -- so it counts as alive."""
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE or len(os.listdir(f"/proc/{p.pid}/task")) > 1:
                alive.append(p.pid)
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass
    return alive


def _kill_leftovers(procs, family) -> None:
    """A test's clean-up: every process it started that still runs, and every orphaned worker it recorded."""
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_a_live_run_locks_its_folder_and_sigkill_of_its_agent_stops_the_workers_unsaved(tmp_path):
    run_dir = tmp_path / "run"
    # A long run; TensorBoard outside the folder, so the folder holds only what the checkpoints write.
    live = _start(torchrun(2, "train.steps=400", "checkpoint.save_interval=5", "checkpoint.keep_last=0",
                           f"checkpoint.dir={run_dir}", f"logging.tensorboard_dir={tmp_path / 'tb'}"),
                  tmp_path, tmp_path / "live.log")
    try:
        wait_for(lambda: _latest(run_dir) == "step-5", 240, "the live run's first save", live)
        holder = (run_dir / ".lock").read_text()
        # A second run on the same folder, in one process and under torchrun with 2 ranks: refused, no traceback.
        second = {"one": [sys.executable, "-m", "megarank", "train", TINY, f"checkpoint.dir={run_dir}"],
                  "two": torchrun(2, f"checkpoint.dir={run_dir}")}
        procs = {name: _start(cmd, tmp_path, tmp_path / f"{name}.log") for name, cmd in second.items()}
        codes = {name: p.wait(timeout=240) for name, p in procs.items()}
        one, two = ((tmp_path / f"{name}.log").read_text() for name in second)
        refusal = (f"megarank train: error: checkpoint.dir {run_dir} is in use by another live run "
                   f"({holder.strip()}; lock {run_dir / '.lock'}); stop that run or use another checkpoint.dir")
        assert codes["one"] == 2 and "Traceback" not in one, one[-3000:]
        assert [ln for ln in one.splitlines() if ln.startswith("megarank train:")] == [refusal]
        # both ranks stop with the same sentence (rank 0 shares its answer), none waits in a collective
        assert codes["two"] != 0 and two.splitlines().count(refusal) == 2, two[-3000:]
        assert live.poll() is None, "the live run must not notice the refused ones"

        # SIGKILL the agent right after a completed save (the next one is 5 steps away).
        saved = _latest(run_dir)
        wait_for(lambda: _latest(run_dir) != saved, 240, "the live run's next save", live)
        family = psutil.Process(live.pid).children(recursive=True)
        assert len([p for p in family if "megarank" in " ".join(p.cmdline())]) >= 2, family
        live.kill()
        live.wait()  # reaped: the agent is gone and its workers are orphans from here on
        gone_at = time.monotonic()
        before = _snapshot(run_dir)
        wait_for(lambda: not _alive(family), 15, "every worker (and its children) to end", None, interval=0.05)
        print(f"workers ended {time.monotonic() - gone_at:.2f}s after the agent")
    finally:
        _kill_leftovers([live, *locals().get("procs", {}).values()], locals().get("family", []))
    assert _snapshot(run_dir) == before, "a worker wrote into the checkpoint folder after its agent died"
    out = (tmp_path / "live.log").read_text()
    assert out.count(f"the torchrun agent (pid {live.pid}) is gone; stopping without saving") == 2, out[-3000:]
    # The kernel dropped the dead run's lock: this process can take it at once.
    with open(run_dir / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locks = Path("/proc/locks").read_text()
            holders = [ln.split()[4] for ln in locks.splitlines() if f":{os.fstat(f.fileno()).st_ino} " in ln]
            info = {h: " ".join(psutil.Process(int(h)).cmdline()) for h in holders if psutil.pid_exists(int(h))}
            raise AssertionError(f"the lock is still held: {info} {locks}") from None


def test_workers_whose_agent_is_killed_while_they_still_import_stop_unsaved(tmp_path):
    """The agent SIGKILLed in the first seconds, while its workers import torch and megatron-core: the workers were
    re-parented before the watchdog module was imported, so the agent's pid is the parent recorded when megarank
    was first imported (megarank/__init__.py), not the parent at the watchdog's import (then the new one). With the
    old rule the workers were still alive 120 s after the agent; now they stop ~10 s after it (their imports)."""
    run_dir = tmp_path / "run"
    live = _start(torchrun(2, "train.steps=100000", f"checkpoint.dir={run_dir}",
                           f"logging.tensorboard_dir={tmp_path / 'tb'}"), tmp_path, tmp_path / "live.log")
    try:
        def workers():
            try:
                return [p for p in psutil.Process(live.pid).children(recursive=True)
                        if "megarank" in " ".join(p.cmdline())]
            except psutil.NoSuchProcess:
                return []

        def importing_torch(proc):
            """Past ``import megarank`` (which records the parent) and inside torch's import: libtorch is mapped.
            A worker that only exists (forked, interpreter starting) has recorded nothing yet; the agent killed
            then is outside what the watchdog can see under plain torchrun (megarank/training/watchdog.py)."""
            try:
                return "libtorch_cpu" in Path(f"/proc/{proc.pid}/maps").read_text()
            except (FileNotFoundError, ProcessLookupError):
                return False

        wait_for(lambda: len(workers()) == 2, 120, "both workers to start", live, interval=0.01)
        family = workers()
        wait_for(lambda: all(importing_torch(p) for p in family), 120, "both workers to import torch", live,
                 interval=0.01)
        live.kill()
        live.wait()
        gone_at = time.monotonic()
        wait_for(lambda: not _alive(family), 120, "every worker to end", None, interval=0.05)
        print(f"workers ended {time.monotonic() - gone_at:.2f}s after the agent")
    finally:
        _kill_leftovers([live], locals().get("family", []))
    out = (tmp_path / "live.log").read_text()
    assert out.count(f"the torchrun agent (pid {live.pid}) is gone; stopping without saving") == 2, out[-3000:]
    assert not (run_dir / "latest").exists()


def test_agent_pid_comes_from_megarank_launch_else_the_parent_at_megaranks_import(monkeypatch):
    import megarank
    from megarank.training import watchdog

    monkeypatch.delenv(watchdog.AGENT_PID_ENV, raising=False)
    assert watchdog.agent_pid() == megarank._PARENT_PID_AT_START == os.getppid()
    monkeypatch.setenv(watchdog.AGENT_PID_ENV, "4242")
    assert watchdog.agent_pid() == 4242


class _Writes:
    """A stream that records each write call (what reaches the file descriptor, when Python is unbuffered)."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        pass


def test_the_lines_every_rank_prints_at_once_are_one_write_each(monkeypatch):
    """Every rank of a torchrun job prints its error line (and the watchdog's) to the one inherited stream at once.
    With PYTHONUNBUFFERED, print() writes the text and its newline in two calls, and CI once saw two ranks' lines
    merged into one ("...checkpoint.dirmegarank train: error: ..."): each line is one write, newline included."""
    from megarank.cli.main import run_reporting_errors
    from megarank.data import DataError
    from megarank.training import watchdog

    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)

    def bad_input():
        raise DataError("groups.jsonl line 3: 'query' is empty")

    assert run_reporting_errors("train", bad_input) != 0
    assert [w for w in stream.calls if w] == ["megarank train: error: groups.jsonl line 3: 'query' is empty\n"]

    stream.calls.clear()

    def ended(code):
        raise SystemExit(code)

    monkeypatch.setattr(watchdog.os, "_exit", ended)
    with pytest.raises(SystemExit):
        watchdog.AgentWatchdog(4242, "1")._stop_now()
    assert [w for w in stream.calls if w] == [
        "megarank train: rank 1: the torchrun agent (pid 4242) is gone; stopping without saving (the checkpoint "
        "folder keeps its last complete step)\n"]


def test_run_lock_names_its_holder_and_is_freed_by_release_or_garbage_collection(tmp_path):
    from megarank.checkpoint.lock import LOCK_FILE, try_lock

    lock, refusal = try_lock(tmp_path / "run")  # creates the folder
    assert lock is not None and refusal is None
    holder = (tmp_path / "run" / LOCK_FILE).read_text().strip()
    assert holder.startswith("host ") and f" pid {os.getpid()} since " in holder
    # flock conflicts between two open files even in one process: a second try is refused, naming the holder
    again, refusal = try_lock(tmp_path / "run")
    assert again is None and refusal == (f"checkpoint.dir {tmp_path / 'run'} is in use by another live run ({holder}; "
                                         f"lock {tmp_path / 'run' / LOCK_FILE}); stop that run or use another "
                                         "checkpoint.dir")
    lock.release()
    lock, refusal = try_lock(tmp_path / "run")
    assert lock is not None and refusal is None
    del lock  # a train() that raised drops its lock with the frame
    lock, refusal = try_lock(tmp_path / "run")
    assert lock is not None
    (tmp_path / "file").write_text("")
    none, refusal = try_lock(tmp_path / "file" / "run")  # a folder that cannot be made: one sentence, no raise
    assert none is None and refusal.startswith(f"cannot create the run lock {tmp_path / 'file' / 'run' / LOCK_FILE}: ")


def test_a_collective_broken_by_a_peer_whose_agent_died_ends_as_the_watchdog_stop(tmp_path):
    """The race test_a_live_run_locks_its_folder... can lose: rank 1's watchdog exits first and rank 0's gloo
    collective raises before rank 0's watchdog polls. The trainer then checks the agent itself: one line, the
    watchdog's exit code, no traceback."""
    script = tmp_path / "broken_peer.py"
    script.write_text(
        "import sys\n"
        "import megarank.training.loop as loop\n"
        "import megarank.training.watchdog as watchdog\n"
        "from megarank.cli.main import main\n"
        "watchdog._watchdog = watchdog.AgentWatchdog(agent_pid=-1, rank='0')  # an agent that is not our parent\n"
        "def train(cfg):\n"
        "    raise RuntimeError('[gloo/transport/tcp/pair.cc:553] Connection closed by peer')\n"
        "loop.train = train\n"
        f"sys.exit(main(['train', {TINY!r}]))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "rank 0: the torchrun agent (pid -1) is gone; stopping without saving" in proc.stderr
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr


# ----------------------------------------------------------------------------------------------- Ctrl-C

# Steps of about a second (the tiny config's take 0.1 s), so that a second Ctrl-C lands inside the step
# that the first one waits for.
SLOW = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=1024"]


def _launch(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "megarank", "launch", TINY, *overrides]


def _ctrl_c(cmd: list[str], cwd: Path, log_path: Path, after: str, presses: int = 1, gap: float = 0.2,
            env: dict | None = None) -> tuple[int, str, float]:
    """Run ``cmd`` as the foreground job of a terminal would be (a process group of its own), press Ctrl-C
    (SIGINT to the group) once ``after`` is in its output, ``presses`` times ``gap`` seconds apart;
    -> (exit code, output, seconds from the last press to the exit)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_as_a_foreground_job)
    try:
        wait_for(lambda: after in log_path.read_text(), 240, repr(after), proc)
        for press in range(presses):
            if press:
                time.sleep(gap)
            pressed = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=GRACE_S + 30)
        took = time.monotonic() - pressed
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc.returncode, log_path.read_text(), took


def _no_traceback(out: str) -> None:
    for noise in ("Traceback", "KeyboardInterrupt", "SignalException", "death signal", "closing signal"):
        assert noise not in out, f"{noise!r} in the output:\n{out[-4000:]}"


def _saved_by_ctrl_c(out: str, run_dir: Path) -> int:
    lines = [ln for ln in out.splitlines() if "interrupted" in ln and "megarank launch" not in ln]
    assert len(lines) == 1, out[-4000:]  # one line, on the logging rank only
    step = int(lines[0].split("saved step ", 1)[1].split()[0])
    assert lines[0].endswith(f"megarank train: interrupted: saved step {step} to {run_dir / f'step-{step}'}; "
                             "run the same command to resume"), lines[0]
    assert _latest(run_dir) == f"step-{step}" and (run_dir / f"step-{step}" / "megarank_checkpoint.json").is_file()
    assert not list(run_dir.glob(".step-*")), sorted(os.listdir(run_dir))
    return step


@pytest.mark.parametrize("how", ["one process", "megarank launch NPROC=2"])
def test_ctrl_c_saves_the_next_step_in_one_line_exits_130_and_resumes_bit_identical(straight, tmp_path, how):
    """The uninterrupted runs are `straight`'s (plain `megarank train` and `megarank launch` train as torchrun does)."""
    layout = "1-rank" if how == "one process" else "dp2-distributed-optimizer"
    nproc, extra = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    args = [*ARGS, *extra, f"checkpoint.dir={run_dir}"]
    cmd = train_cmd(1, *args) if nproc == 1 else _launch(*args)
    env = run_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE_S), NPROC=str(nproc))
    rc, out, took = _ctrl_c(cmd, tmp_path, tmp_path / "ctrl-c.log", after=f"step {SAVE + 1}/{STEPS}", env=env)
    assert rc == 130, out[-4000:]
    _no_traceback(out)
    step = _saved_by_ctrl_c(out, run_dir)
    print(f"{how}: Ctrl-C after step {SAVE + 1}; saved step {step}; exited {took:.1f}s later")
    # the boundary right after the step shown when Ctrl-C was pressed may be the one that saves
    assert SAVE + 1 <= step < STEPS and max(log_lines(out)) == step, out[-3000:]
    if nproc > 1:  # the launcher's own line ends the output: the agent's SignalException, without its traceback
        assert out.rstrip().splitlines()[-1] == "megarank launch: interrupted", out[-2000:]

    resumed = run(cmd, cwd=tmp_path, env=env).stdout
    assert f"resumed from {run_dir / f'step-{step}'} at step {step}" in resumed
    assert min(log_lines(resumed)) == step + 1 and _latest(run_dir) == f"step-{STEPS}"
    for part in ("model", "optimizer"):
        assert_bit_identical(_final(straight / layout, part), _final(run_dir, part), f"{how} {part}")


@pytest.mark.parametrize("how", ["one process", "megarank launch NPROC=2"])
def test_a_second_ctrl_c_stops_at_once_unsaved_in_one_line(tmp_path, how):
    nproc = 1 if how == "one process" else 2
    run_dir = tmp_path / "run"
    args = ["train.steps=400", "train.log_interval=1", "checkpoint.save_interval=0", *SLOW, f"checkpoint.dir={run_dir}"]
    cmd = train_cmd(1, *args) if nproc == 1 else _launch(*args)
    rc, out, took = _ctrl_c(cmd, tmp_path, tmp_path / "twice.log", after="step 1/400", presses=2,
                            env=run_env(NPROC=str(nproc)))
    print(f"{how}: exited {took:.2f}s after the second Ctrl-C")
    assert rc == 130, out[-4000:]
    _no_traceback(out)
    shown = [ln for ln in out.splitlines() if "interrupted" in ln]
    if nproc == 1:  # the trainer's own line
        assert shown == [f"megarank train: interrupted again: stopped at once, without saving ({run_dir} keeps its "
                         "last complete step)"], out[-3000:]
    else:  # the launcher SIGKILLs the workers (and their writer processes) and says so
        assert shown == ["megarank launch: interrupted again: stopped the workers at once, without saving"], out[-3000:]
    assert took < 5, f"{took:.1f}s"
    assert max(log_lines(out)) < 3 and not (run_dir / "latest").exists(), sorted(os.listdir(run_dir))


@pytest.mark.skipif(not (CRANFIELD / "corpus.jsonl").is_file(), reason=f"Cranfield is not at {CRANFIELD}")
def test_ctrl_c_to_evaluate_prints_one_line_and_leaves_no_partial_run_file(straight, tmp_path):
    out_file = tmp_path / "run.trec"
    parts = tmp_path / "run.trec.parts"
    cmd = [sys.executable, "-m", "megarank", "evaluate", str(straight / "1-rank" / f"step-{STEPS}"),
           "--data", str(CRANFIELD), "--max-queries", "30", "--queries-per-part", "2", "--batch-size", "8",
           "--batch-tokens", "0", "--dtype", "fp32", "--out", str(out_file)]
    log_path = tmp_path / "evaluate.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_as_a_foreground_job)
    try:
        wait_for(lambda: (parts / "part-000000.trec").exists(), 240, "the first saved part", proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    out = log_path.read_text()
    assert proc.returncode == 130, out[-4000:]
    _no_traceback(out)
    assert out.rstrip().splitlines()[-1] == "megarank evaluate: interrupted", out[-2000:]
    # no run file, no temp file beside it; the saved parts stay for the next run (each written atomically)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.log", "run.trec.parts"]
    names = sorted(p.name for p in parts.iterdir())
    assert names[0] == "job.json" and all(n.startswith("part-") and n.endswith(".trec") for n in names[1:]), names
    assert len(names) - 1 < 15, "the job finished before the Ctrl-C"


def test_ctrl_c_to_quickstart_saves_its_training_step_and_runs_nothing_after(tmp_path):
    """Ctrl-C reaches quickstart's running step (the terminal's foreground group): `megarank train` saves the next
    step and says so, quickstart prints its own one line, exit 130, and no later step (evaluate, export) runs."""
    work = tmp_path / "qs"
    cmd = [sys.executable, "-m", "megarank", "quickstart", "--workdir", str(work), "train.steps=400",
           "train.log_interval=1"]  # the model is the built-in tiny one: quickstart converts it before training
    rc, out, took = _ctrl_c(cmd, tmp_path, tmp_path / "quickstart.log", after="step 2/400",
                            env=run_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE_S)))
    assert rc == 130, out[-4000:]
    _no_traceback(out)
    assert out.rstrip().splitlines()[-1] == "megarank quickstart: interrupted", out[-2000:]
    saved = [ln for ln in out.splitlines() if "megarank train: interrupted: saved step" in ln]
    assert len(saved) == 1, out[-3000:]
    step = int(saved[0].split("saved step ", 1)[1].split()[0])
    assert _latest(work / "train") == f"step-{step}", sorted(os.listdir(work / "train"))
    assert not (work / "reranker-hf").exists() and not (work / "test.metrics.json").exists(), sorted(os.listdir(work))
