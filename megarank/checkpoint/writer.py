"""Keep megatron-core's torch_dist checkpoint writer inside the saving process: no helper process to lose.

megatron-core 0.16.1 hands every writer's results over a queue that its first save creates with
``mp.get_context("spawn").Manager().Queue()`` (dist_checkpointing/strategies/filesystem_async.py:51-56,
cached in the module global ``_results_queue``, requested at :185). That Manager is a separate Python
process, started in the trainer's process group and session. torchrun forwards SIGTERM with
``os.killpg`` to each worker's group (torch/distributed/elastic/multiprocessing/subprocess_handler/
subprocess_handler.py:85) and SLURM signals every process of a step, so the Manager dies of the very
signal that asks the trainer to save, and that save then fails with ``BrokenPipeError``.

For the synchronous saves megarank makes, that queue never leaves the process: ``dist_checkpointing.save``
runs the write function in the caller (strategies/base.py:212-215 -> async_utils.py:79-103) and the
writer reads the results back with ``get_nowait`` / ``queue.Empty`` (filesystem_async.py:424-441). A plain
``queue.Queue`` has exactly that interface (the Manager only proxies one), so it replaces the Manager
without changing a byte of the checkpoint. The per-save writer processes (fork context,
filesystem_async.py:266-291) stay: they are forked, so they inherit the trainer's Python SIGTERM handler
(a flag) and finish their files.

Async saves (``async_sharded_save=True``) write from another process and would need a real
multiprocessing queue; megarank does not use them.
"""
from __future__ import annotations

import queue


def keep_writer_in_process() -> None:
    """Make the torch_dist writer's results queue an in-process ``queue.Queue`` (idempotent; call before a save).

    A queue that megatron already created (a Manager proxy) is replaced too, so a process that saved
    before this call stops depending on its helper process from the next save on.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # the contract above moved: fail loudly, not later
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no _results_queue; "
                           "megarank.checkpoint.writer must follow the installed megatron-core")
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
