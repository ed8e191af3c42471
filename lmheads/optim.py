"""The optimizer side of training: AdamW parameter groups, the learning-rate schedule and gradient
clipping that works with a fused AdamW, mixed precision and FSDP."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch import nn

from lmheads.sharding import fsdp1_root, unwrapped_name


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at step
    ``total``, and ``min_ratio`` after it (nanoGPT's ``lr_decay_iters``); a ``total`` that is not finite
    (training of no set length) keeps the peak after warmup.

    An object, not a function: ``LambdaLR`` saves a callable object's attributes in its state, so a
    checkpoint holds the length the schedule decays over and a resumed run keeps it, whatever
    ``max_steps`` it continues to (rebuilt from the new ``max_steps``, a run that had decayed to 10% would
    jump back to a learning rate that neither a short nor a long run ever had at that step).
    """

    def __init__(self, warmup: int, total: float, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not math.isfinite(self.total) or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def steps(self) -> int:
        """The steps the learning rate decays over (-1: no set length)."""
        return int(self.total) if math.isfinite(self.total) else -1

    def note(self, run_steps: float) -> str | None:
        """What a run of ``run_steps`` optimizer steps should be told about this schedule, if its length
        is not the run's."""
        steps, run = self.steps, int(run_steps) if math.isfinite(run_steps) else -1
        if steps < 0 or run < 0 or steps == run:
            return None
        if steps < run:
            return (
                f"learning rate: decays over the first {steps:,} steps (the schedule this run started with), "
                f"then stays at min_lr_ratio x lr = {self.min_ratio:g} x lr to step {run:,}"
            )
        return f"learning rate: this run stops at step {run:,} of the {steps:,} its schedule decays over"


def decay_names(module: nn.Module) -> frozenset[str]:
    """Names of the parameters that get weight decay: matrices and embeddings, not biases and norms.
    Decided on the unwrapped module (FSDP1 with use_orig_params shows each parameter as a 1-D view of
    its shard)."""
    return frozenset(n for n, p in module.named_parameters() if p.ndim >= 2)


def adamw(module: nn.Module, decay: frozenset[str], hp, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``module``'s parameters with weight decay on the parameters named in ``decay``;
    ``fused`` runs the update as one kernel. A tied weight is one tensor and lands in exactly one group
    (``named_parameters`` yields each tensor once)."""
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups[unwrapped_name(name) in decay].append(p)
    return torch.optim.AdamW(
        [
            {"params": groups[True], "weight_decay": hp.weight_decay},
            {"params": groups[False], "weight_decay": 0.0},
        ],
        lr=hp.lr,
        betas=tuple(hp.betas),
        fused=fused,
    )


def clip_gradients(
    module, optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None = None
) -> None:
    """Clip the gradients of ``optimizer``'s parameters at ``value`` (by norm, or by value).

    Lightning's own clipping refuses two usual settings: mixed precision with a fused AdamW (which
    would unscale fp16 gradients inside ``step``) and clipping by norm under FSDP1. Here fp16 gradients
    are unscaled first (``GradScaler.unscale_`` before a fused ``step`` is supported: the step then
    skips its own unscaling), FSDP1 clips through its root unit (the norm over every shard), and
    everything else through ``torch.nn.utils``, which handles FSDP2's sharded tensors.
    """
    if not value:
        return
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)  # for other optimizers Lightning has unscaled before this hook
    params = [p for group in optimizer.param_groups for p in group["params"]]
    root = fsdp1_root(module)
    if algorithm == GradClipAlgorithmType.VALUE:
        torch.nn.utils.clip_grad_value_(params, value)
    elif root is not None:
        root.clip_grad_norm_(value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


class OptimizerHooks:
    """The LightningModule hooks of the optimizer side, for a module with ``hparams`` (``lr``,
    ``weight_decay``, ``betas``, ``warmup_steps``, ``min_lr_ratio``, ``lr_decay_steps``), ``_decay_names``
    and ``schedule`` (the :class:`WarmupCosine` in use, once the optimizer is made)."""

    def make_optimizer(self, fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on matrices and embeddings only (:func:`adamw`); ``fused``
        (default: on CUDA) runs the update as one kernel."""
        return adamw(
            self, self._decay_names, self.hparams, self.device.type == "cuda" if fused is None else fused
        )

    def _new_schedule(self) -> WarmupCosine:
        hp = self.hparams
        # estimated_stepping_batches accounts for max_steps, epochs and gradient accumulation
        total = hp.lr_decay_steps or self.trainer.estimated_stepping_batches
        return WarmupCosine(hp.warmup_steps, total, hp.min_lr_ratio)

    def schedule_steps(self) -> int:
        """The optimizer steps the learning rate decays over, which heads that act at a fraction of
        training count in too (-1: training of no set length)."""
        return (self.schedule or self._new_schedule()).steps

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        self.schedule = self._new_schedule()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once. Lightning zeroes them inside the next step's
        closure, after its forward: until then they would sit beside that forward's activations, a full
        float32 copy of the parameters on top of the peak. With gradient accumulation this runs only at
        the last batch of each group, so the group's gradients still add up."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``--trainer.gradient_clip_val`` under every precision and strategy (:func:`clip_gradients`)."""
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_start(self) -> None:
        """Says how a resumed run's schedule differs from one of its new length."""
        if self.schedule is None:  # a subclass's own optimizers
            return
        note = self.schedule.note(self.trainer.estimated_stepping_batches)  # the checkpoint's is restored now
        if note:
            rank_zero_info(note)

    def forget_moments(self, params) -> None:
        """Drop the optimizers' state of ``params`` (a head that changed its parameters)."""
        for optimizer in self.trainer.optimizers:
            for p in params:
                optimizer.state.pop(p, None)
