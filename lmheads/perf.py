"""Measuring speed and memory: the throughput every run logs, and for the benchmarks peak memory, a
device's matmul peak, model FLOPs per token and the checks of their command lines (the device's also
serves ``harness``)."""

from __future__ import annotations

import argparse
import gc
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch

MiB = 2**20


def count_arg(minimum: int = 1):
    """An argparse type: a whole number of at least ``minimum`` (a count of 0 timed nothing, or divided
    by it)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"give a whole number of at least {minimum}, got {value!r}")
        return number

    return parse


def device_arg(value: str) -> str:
    """An argparse type: a device torch can use here (``cuda`` without one ended in torch's traceback)."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("torch sees no CUDA device here; give --device cpu")
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where work is not queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the level at :meth:`reset`: the CUDA allocator's, or on Linux CPUs the
    process's peak resident set (VmHWM, which writing 5 to ``/proc/self/clear_refs`` resets). The CPU
    figure is coarse: memory the C allocator keeps after a free is not seen again."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.status = Path("/proc/self/status")
        self.clear = Path("/proc/self/clear_refs")
        self.available = self.cuda or (self.status.exists() and self.clear.exists())
        self.base = 0

    def _kib(self, key: str) -> int:
        for line in self.status.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in {self.status}")

    def reset(self) -> None:
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.available:
            gc.collect()  # garbage freed later would lower the resident set below the baseline
            self.clear.write_text("5")
            self.base = self._kib("VmRSS:")

    def peak_mib(self, absolute: bool = False) -> float:
        """Peak since :meth:`reset`, above the level then (or in total with ``absolute``)."""
        base = 0 if absolute else self.base
        if self.cuda:
            synchronize(self.device)
            return (torch.cuda.max_memory_allocated() - base) / MiB
        return (self._kib("VmHWM:") - base) / MiB if self.available else math.nan


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """Dense matmul throughput measured here and now: the denominator of MFU."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    iters = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


class TokenThroughput(L.Callback):
    """Logs ``perf/tokens_per_sec`` (all devices together) and ``perf/peak_mem_mib`` every
    ``log_every_n_steps`` optimizer steps.

    A window of steps is timed with one device synchronisation at its end, so the training step itself
    never waits for the host. Validation time is excluded: a window restarts after each validation.
    Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._tokens = 0
        self._step = -1  # the optimizer step counted last

    def _restart(self, trainer: L.Trainer) -> None:
        synchronize(trainer.strategy.root_device)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self._t0 is None:
            self._restart(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self._tokens += batch[0].numel()
        step = trainer.global_step  # advances only when the optimizer stepped (not while accumulating)
        if step == self._step or step % trainer.log_every_n_steps:
            return
        self._step = step
        device = trainer.strategy.root_device
        synchronize(device)
        elapsed = time.perf_counter() - self._t0
        tokens_per_sec = self._tokens * trainer.world_size / max(elapsed, 1e-9)
        if device.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        pl_module.log_dict(
            {
                "perf/tokens_per_sec": tokens_per_sec,
                "perf/peak_mem_mib": float(peak_mib),
                "hp/tokens_per_sec": tokens_per_sec,
            },
            on_step=True,
            on_epoch=False,
            sync_dist=False,
            rank_zero_only=True,
        )
        self._restart(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None
