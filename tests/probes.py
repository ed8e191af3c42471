"""Callbacks that tests put into real runs with --trainer.callbacks+=tests.probes.NAME."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from lmheads.backbone import BackboneConfig
from lmheads.heads import head_name


class SignalAt(L.Callback):
    """Sends a signal to this process after the given optimizer step (on every rank, or on one); or, with
    ``batch``, after that batch of the first epoch, which may be one that only accumulates gradients."""

    def __init__(
        self, step: int = -1, signum: int = int(signal.SIGINT), rank: int | None = None, batch: int = -1
    ) -> None:
        self.step, self.signum, self.rank, self.batch = step, signum, rank, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        at_batch = batch_idx == self.batch and trainer.current_epoch == 0
        if (at_batch or trainer.global_step == self.step) and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class ExitAt(L.Callback):
    """Ends this process at once after the given optimizer step, as a scheduler's kill does: no hook, no
    checkpoint, no flushed logger."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(137)


class StopAfterBatch(L.Callback):
    """Asks the trainer to stop after the given batch of the first epoch, as ``max_time``'s timer does
    after whichever batch its time runs out (``trainer.should_stop``)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch and trainer.current_epoch == 0:
            trainer.should_stop = True


class WaitForSignal(L.Callback):
    """Holds a fresh run of the given head (not one continued from a checkpoint) before the given optimizer
    step until the process receives SIGINT or SIGTERM, for at most a minute: a test's signal then lands at
    a known step, however fast the machine trains."""

    def __init__(self, step: int, head: str) -> None:
        self.step, self.head = step, head

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        fresh = trainer.global_step == self.step and trainer.ckpt_path is None
        if not fresh or head_name(pl_module.head) != self.head:
            return
        interrupt = next(c for c in trainer.callbacks if type(c).__name__ == "InterruptCheckpoint")
        deadline = time.monotonic() + 60
        while interrupt.signal is None and time.monotonic() < deadline:
            time.sleep(0.05)


class SignalWithWorkers(L.Callback):
    """Ctrl-C in a terminal, or a scheduler's SIGTERM to every task: the signal to the DataLoader's worker
    processes and to this one, after the given optimizer step, or (``step=-1``) in the sanity check's
    first validation batch, before training."""

    def __init__(self, step: int = -1, signum: int = int(signal.SIGINT)) -> None:
        self.step, self.signum = step, signum

    def _signal(self) -> None:
        workers = multiprocessing.active_children()
        assert workers, "no DataLoader worker to signal"
        for worker in workers:
            os.kill(worker.pid, self.signum)
        time.sleep(0.5)  # the workers' handlers have run
        os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self._signal()

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.sanity_checking and self.step == -1:
            self._signal()


class SignalInSetup(L.Callback):
    """Sends a signal (SIGTERM unless told) to this process while the trainer sets up, before training
    starts, inside an ``except Exception`` as libraries have around the code a signal may land in."""

    def __init__(self, signum: int = int(signal.SIGTERM)) -> None:
        self.signum = signum

    def setup(self, trainer, pl_module, stage) -> None:
        with contextlib.suppress(Exception):  # a fallback for a failure, which an interruption is not
            os.kill(os.getpid(), self.signum)


class FailOnStart(L.Callback):
    """Fails as the first training (or test) step would, a GPU out of memory say: after the checkpoint
    the command started from has been restored."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError(f"a failure at step {trainer.global_step}, before training")

    on_test_start = on_train_start


class NoHostSync(L.Callback):
    """Makes every host synchronisation of a CUDA training step an error (``torch.cuda.set_sync_debug_mode``)
    from the start of its batch to its end: the module's step, backward, clipping and optimizer step, and
    the batch-start hooks of lmheads' callbacks, which run after this one (a callback given on the
    command line comes first). Steps that log (one sync per logging interval, by design) and the first
    step (lazy initialisation) are not watched."""

    def __init__(self) -> None:
        self.watched = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step + 1  # the optimizer step this batch makes
        if trainer.global_step > 0 and step % trainer.log_every_n_steps:
            torch.cuda.set_sync_debug_mode("error")
            self.watched += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


class PoisonAt(L.Callback):
    """Makes the weights NaN before the given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.backbone.ln_f.weight.fill_(float("nan"))


class WorseningValidation(L.Callback):
    """Makes each validation's loss the step it comes at, so every validation after the first reads as
    worse than the one before, as in a run that overfits: its best checkpoint stays the first one."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # before the module's, which logs
        if trainer.sanity_checking:
            return
        metric, step = pl_module.eval_nll["val"].nll, float(trainer.global_step)
        result = metric.compute()
        metric.compute = lambda: {**result, "loss": torch.tensor(step)}


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


FSDP1_BACKBONE = BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=8)


def fsdp1_worker(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes: the module wrapped by FSDP1 as Lightning's FSDPStrategy wraps it (blocks
    in their own units, ``use_orig_params``). Saves its optimizer groups, the embedding's shape inside
    :func:`lmheads.sharding.gathered` and a greedy continuation through the root unit."""
    import warnings
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lmheads.backbone import Block
    from lmheads.module import LMHeadModule
    from lmheads.sharding import fsdp1_root, gathered

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = LMHeadModule(backbone=FSDP1_BACKBONE, vocab_size=50)
    prompt = torch.arange(6).view(2, 3)
    reference = module.generate(prompt, 4, temperature=0)
    policy = ModuleWrapPolicy({Block})
    root = FullyShardedDataParallel(module, auto_wrap_policy=policy, use_orig_params=True, device_id="cpu")
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    groups = [len(group["params"]) for group in module.make_optimizer().param_groups]
    with gathered(module):
        embedding = tuple(module.backbone.wte.weight.shape)
    continuation = module.generate(prompt, 4, temperature=0, logits_fn=fsdp1_root(module))
    torch.save(
        {"groups": groups, "embedding": embedding, "same": bool((continuation == reference).all())},
        os.path.join(folder, f"fsdp1-rank{rank}.pt"),
    )
    dist.barrier()  # neither process tears down its connections while the other still sends on them
    dist.destroy_process_group()
