"""Callbacks that tests put into real runs with --trainer.callbacks+=tests.probes.NAME."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class SignalAt(L.Callback):
    """Sends a signal to this process after the given optimizer step (on every rank, or on one)."""

    def __init__(self, step: int, signum: int = int(signal.SIGINT), rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class PoisonAt(L.Callback):
    """Makes the weights NaN before the given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.backbone.ln_f.weight.fill_(float("nan"))


class GradDump(L.Callback):
    """Saves the gradients of the first optimizer step (after DDP's all-reduce, or gathered from FSDP's
    shards) to a folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            grads = {n: _full(p.grad).detach().clone() for n, p in pl_module.named_parameters()}
            path = os.path.join(self.folder, f"grads-rank{trainer.global_rank}-of{trainer.world_size}.pt")
            torch.save(grads, path)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every process calls it), else the tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
