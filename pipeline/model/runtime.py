"""Where training runs: the device, mixed precision, and this process's place among torchrun ranks.

The same training code runs single-process or under `torchrun` (DistributedDataParallel, gloo on
the CPU, NCCL on CUDA); everything that differs between the two is here, so the fold loop reads the
same either way. With one process every collective is a no-op.

On Linux the CPU path also tells glibc's allocator to keep freed memory (`steady_malloc`): a
training step frees and re-allocates the same large activation buffers, and by default glibc hands
them back to the kernel and maps them afresh, so a step pays page faults for its own memory.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from typing import Any

import torch
from tqdm import tqdm

from pipeline.params import TrainParams


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where this process trains: device, mixed precision, and its place among torchrun ranks."""

    device: torch.device
    amp: bool
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """One line on stderr from rank 0 (through tqdm, so it does not break a progress bar)."""
        if self.main:
            tqdm.write(message, file=sys.stderr)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU batch on this process's device (channels_last on CUDA)."""
        if self.device.type == "cuda":
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        if self.world == 1:
            return flag
        x = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return bool(x.item())

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over all ranks, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics: each rank updated its own) on every rank."""
        if self.world > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel over the ranks, or the model itself."""
        if self.world == 1:
            return model
        # static_graph: with encoder_depth < 5 smp keeps the encoder's deeper stages, which get no gradient
        return torch.nn.parallel.DistributedDataParallel(model, static_graph=True)

    def describe(self) -> str:
        """'training on cpu, 4 threads' / 'training on cuda x2 ranks, bf16 autocast'."""
        return (f"training on {self.device.type}" + (f" x{self.world} ranks" if self.world > 1 else "")
                + (", bf16 autocast" if self.amp
                   else f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20   # the largest glibc accepts: blocks below it come from the heap and stay there
TRIM_THRESHOLD = 2**30        # free memory kept at the top of the heap before glibc returns it


def steady_malloc() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the kernel; True where it applies.

    glibc's default mmap/trim thresholds adapt as a run goes, so the first dozen or so CPU training steps,
    and bursts later on, pay page faults for memory the previous step just freed: measured on 2 cores at
    96x128, batch 8, 45-85 ms per image against 26 steady, which also misled the plan's throughput probe
    (`benchmarks/bench_malloc.py`). Fixed thresholds remove that. tcmalloc, when preloaded, does the same
    on its own; this is a no-op for it and off Linux/glibc."""
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def setup_runtime(t: TrainParams) -> Runtime:
    """CUDA (bf16 autocast, channels_last) when present, else CPU with `train.threads` threads and a steady
    allocator; joins torchrun's group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        steady_malloc()
        per_proc = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
        torch.set_num_threads(t.threads or per_proc)
    rank = 0
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank = torch.distributed.get_rank()
    return Runtime(torch.device("cuda", local) if cuda else torch.device("cpu"), amp=cuda and t.amp,
                   rank=rank, world=world)


def teardown(rt: Runtime) -> None:
    """Leave torchrun's process group (nothing to do in a single process)."""
    if rt.world > 1:
        torch.distributed.destroy_process_group()
