"""Smoke test of a launch: every rank joins, all-reduces, and rank 0 reports who took part.

    megarank launch --script launch/allreduce_check.py            # or through launch/slurm/train.sbatch
    ALLREDUCE_MB=256 ... (payload size; default 1 MB)

Run it before a long job on a new cluster/container: it proves rendezvous, the backend (NCCL on GPU, gloo on
CPU) and the network without loading a model. Exits non-zero if the sum is wrong.
"""
import os
import socket
import time

import torch
import torch.distributed as dist


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    numel = int(float(os.environ.get("ALLREDUCE_MB", "1")) * 2**20 / 4)
    x = torch.full((numel,), float(rank + 1), device=device)
    dist.all_reduce(x)  # warm-up, also the correctness check
    expected = world * (world + 1) / 2
    ok = bool(torch.all(x == expected))
    start = time.perf_counter()
    dist.all_reduce(x)
    if backend == "nccl":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    hosts = [None] * world
    dist.all_gather_object(hosts, f"{socket.gethostname()}:{local_rank}")
    oks = [None] * world
    dist.all_gather_object(oks, ok)
    if rank == 0:
        bus_gbps = 2 * (world - 1) / world * numel * 4 / seconds / 1e9
        print(f"allreduce_check: world {world} backend {backend} ranks {' '.join(hosts)}", flush=True)
        print(f"allreduce_check: {'ok' if all(oks) else 'WRONG SUM'}; {numel * 4 / 2**20:.1f} MB in {seconds * 1e3:.1f} ms"
              f" (bus {bus_gbps:.2f} GB/s)", flush=True)
    dist.destroy_process_group()
    if not all(oks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
