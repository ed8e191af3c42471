"""The optimizer side of training: AdamW parameter groups, the learning-rate schedule and gradient
clipping that works with a fused AdamW, mixed precision and FSDP."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from lmheads.sharding import fsdp1_root, unwrapped_name


def warmup_cosine(step: int, warmup: int, total: float, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
