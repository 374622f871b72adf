"""Several processes on one machine through torchrun (params `distributed.nproc_per_node`).

A stage whose params ask for N > 1 processes starts itself again under
`python -m torch.distributed.run --standalone --nproc_per_node N` (`relaunch`), with the same
arguments; each process joins the process group (`init`: NCCL on GPUs, one per process, gloo on a
CPU) and the stage shares out its work:

- inversion: concepts (or batches of `invert.concepts_per_batch`) go to the ranks in turn, each
  optimized exactly as one process optimizes it, into one output folder that rank 0 puts in place
  once every rank is done (`shared_atomic_dir`);
- evaluation: image batches go to the ranks in turn (`my_chunks`), each the batch one process
  embeds, scores or captions, and every rank gathers every batch's rows (`gather_chunks`), so the
  metrics are one process's; rank 0 writes them;
- fine-tuning: DistributedDataParallel over the shards of each batch (ktpipe.transfer.finetune).

Outside torchrun (or with one process) every helper is the identity: `rank()` is 0, `world_size()` 1.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ktpipe.io import atomic_dir


def launched() -> bool:
    """Whether torchrun started this process (it sets LOCAL_RANK and WORLD_SIZE in every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run` running `python -m MODULE ARGS` in `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def relaunch(nproc: int, module: str, args: Sequence[str]) -> int:
    """Run the stage module again under torchrun in `nproc` processes; returns torchrun's exit status."""
    print(f"ktpipe: running {module} in {nproc} processes: torchrun --standalone --nproc_per_node {nproc}",
          file=sys.stderr, flush=True)
    return subprocess.run(relaunch_command(nproc, module, args)).returncode


def distribute(params: Any) -> None:
    """Run this stage in params `distributed.nproc_per_node` processes when that is above 1: outside
    torchrun, start the same command again under `torchrun --standalone --nproc_per_node N` and exit
    with its status; inside it, join the process group (ranks other than 0 print nothing on stdout:
    rank 0 tells what the stage did, and every rank's errors still show)."""
    nproc = params.distributed.nproc_per_node
    if nproc == 1:
        return
    if launched():
        init(params.model.device)
        if not is_main():
            sys.stdout = open(os.devnull, "w")
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m stages.invert ...`, or the
    module = spec.name if spec is not None and spec.name.startswith("stages") else "stages"  # ktpipe script
    raise SystemExit(relaunch(nproc, module, sys.argv[1:]))


def init(device: str) -> None:
    """Join torchrun's process group (a no-op outside torchrun or when joined): NCCL with this
    process's own GPU (LOCAL_RANK) when the model runs on CUDA, gloo on a CPU."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    from ktpipe.models import pick_device

    if pick_device(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, obj)
    return found


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (itself in one process)."""
    import torch.distributed as dist

    if not active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (torch.tensor_split's sizes: they differ by at most one)."""
    world, me = world_size(), rank()
    base, extra = divmod(n, world)
    start = me * base + min(me, extra)
    return slice(start, start + base + (me < extra))


def my_chunks(n: int, batch_size: int) -> list[range]:
    """The batches of n items (`batch_size` each, the last one shorter) this rank computes: batch j
    on rank j mod world, so each is the batch one process computes."""
    chunks = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return chunks[rank()::world_size()]


def gather_chunks(mine: list[Any]) -> list[Any]:
    """Every batch's result in batch order, from each rank's results of its `my_chunks` batches."""
    if not active():
        return mine
    parts = gather_objects([_to_cpu(x) for x in mine])
    world = len(parts)
    total = sum(len(p) for p in parts)
    return [parts[j % world][j // world] for j in range(total)]


def _to_cpu(x: Any) -> Any:
    return x.cpu() if isinstance(x, torch.Tensor) else x


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """(sum of n_r, ...) every rank's (n_r, ...) rows in rank order, differentiable: the gradient
    reaching this rank's rows is the sum of what every rank's copy sends them (torch.distributed.nn)."""
    if not active():
        return local
    import warnings

    import torch.distributed.nn.functional as collectives

    counts = gather_objects(len(local))
    padded = torch.cat([local, local.new_zeros(max(counts) - len(local), *local.shape[1:])])
    with warnings.catch_warnings():  # deprecated in favour of a private module; the same collective
        warnings.simplefilter("ignore", FutureWarning)
        parts = collectives.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """`module` under DistributedDataParallel on its own device (this rank's GPU, or the CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def shared_atomic_dir(target: str | Path) -> Iterator[Path]:
    """`ktpipe.io.atomic_dir` for every rank: one temporary folder (rank 0's), which replaces
    `target` once every rank has left the block without an error."""
    if not active():
        with atomic_dir(target) as tmp:
            yield tmp
        return
    stack = contextlib.ExitStack()
    tmp = stack.enter_context(atomic_dir(target)) if is_main() else None
    tmp = Path(broadcast_object(str(tmp) if tmp else None))
    try:
        yield tmp
    except BaseException:
        stack.__exit__(*sys.exc_info())
        raise
    barrier()  # every rank has written its part
    stack.close()
