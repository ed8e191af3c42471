"""Loss backends behind one abstract base, and the loss of a head (chosen once, when the module is
built)."""

from __future__ import annotations

import importlib.util
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from lmheads.errors import ConfigError
from lmheads.heads.base import Head, LinearForm, LinearHead, head_name
from lmheads.loss.chunked import ChunkGrad, chunked_token_loss, chunked_train_loss, compute_dtype
from lmheads.loss.reference import (
    IGNORE_INDEX,
    TokenLoss,
    TrainLoss,
    logits_token_loss,
    naive_linear_cross_entropy,
    reduce_token_loss,
)


def _in_compute_dtype(form: LinearForm) -> tuple[Tensor, Tensor, Tensor | None]:
    """h', W, b cast to the autocast dtype: fused kernels compute in their inputs' dtype."""
    dtype = compute_dtype(form.hidden, form.weight)
    bias = form.bias.to(dtype) if form.bias is not None else None
    return form.hidden.to(dtype), form.weight.to(dtype), bias


class LossBackend(ABC):
    """How training and evaluation compute the cross-entropy of a linear head's form."""

    name: ClassVar[str] = ""
    #: pip package and import name, for backends that come from another library.
    package: ClassVar[tuple[str, str] | None] = None
    cuda_only: ClassVar[bool] = False

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size

    def check(self, device: torch.device) -> None:
        """Raise a :class:`ConfigError` saying what to do when this backend cannot run on ``device``."""
        if self.cuda_only and device.type != "cuda":  # first: installing the package would not help
            raise ConfigError(
                f"loss backend {self.name!r} runs on CUDA GPUs only and this run is on {device.type}: use "
                "model.loss_backend=chunked (any device) or auto"
            )
        if self.package is not None and importlib.util.find_spec(self.package[1]) is None:
            raise ConfigError(
                f"loss backend {self.name!r} needs the {self.package[0]} package, which is not installed: "
                f"pip install {self.package[0]}, or use model.loss_backend=chunked (no extra package)"
            )

    @abstractmethod
    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        """Mean NLL over counted tokens plus the z-loss, differentiable."""

    @abstractmethod
    def token_loss(self, form: LinearForm, targets: Tensor, ignore_index: int) -> TokenLoss:
        """Per-token NLL and log-partition."""


class NaiveBackend(LossBackend):
    """The full logits: the reference the others are tested against."""

    name = "naive"

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        return reduce_token_loss(
            naive_linear_cross_entropy(form, targets, ignore_index), targets, ignore_index, z_loss
        )

    def token_loss(self, form: LinearForm, targets: Tensor, ignore_index: int) -> TokenLoss:
        return naive_linear_cross_entropy(form, targets, ignore_index)


class ChunkedBackend(LossBackend):
    """Chunks of C tokens (:func:`chunked_train_loss`); evaluation in chunks without gradients."""

    name = "chunked"

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.chunk_grad = ChunkGrad()

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        return chunked_train_loss(form, targets, ignore_index, z_loss, self.chunk_size, self.chunk_grad)

    def token_loss(self, form: LinearForm, targets: Tensor, ignore_index: int) -> TokenLoss:
        if torch.is_grad_enabled():  # a caller that differentiates per-token values gets the reference
            return naive_linear_cross_entropy(form, targets, ignore_index)
        return chunked_token_loss(form, targets, ignore_index, self.chunk_size)


class LigerBackend(ChunkedBackend):
    """Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024): bias, soft-cap and z-loss.

    Gradients of W and b are accumulated over its chunks in fp32 (``accum_dtype``), as in ``chunked``.
    Liger counts the non-ignored targets with ``.item()`` inside its forward: one host synchronisation
    per step that no caller can avoid (``chunked`` and ``cce`` have none).
    """

    name = "liger"
    package = ("liger-kernel", "liger_kernel")
    cuda_only = True

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        hidden, weight, bias = _in_compute_dtype(form)
        out = liger_fused_linear_cross_entropy(
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=ignore_index,
            lse_square_scale=z_loss,
            softcap=form.softcap,
            return_z_loss=True,
            accum_dtype=torch.float32,
        )
        z = out.z_loss if out.z_loss is not None else torch.zeros_like(out.loss)
        return TrainLoss(out.loss, (out.loss - z).detach(), z.detach())


class CutCrossEntropyBackend(ChunkedBackend):
    """Apple's Cut Cross-Entropy (Wijmans et al. 2025): soft-cap, no bias, no z-loss, bf16/fp16 only.

    Called with ``filter_eps=None``: its default skips gradient blocks whose softmax values are all below
    a threshold, which is faster but not the exact gradient the other backends compute.
    """

    name = "cce"
    package = ("cut-cross-entropy", "cut_cross_entropy")
    cuda_only = True

    def check_form(self, form: LinearForm, z_loss: float) -> None:
        if form.bias is not None or z_loss:
            what = "an output bias" if form.bias is not None else "a z-loss"
            raise ConfigError(
                f"loss backend 'cce' does not support {what}; use model.loss_backend=chunked or liger"
            )
        dtype = compute_dtype(form.hidden, form.weight)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(
                f"loss backend 'cce' computes in bf16 or fp16 only and this run computes in {dtype}: set "
                "--trainer.precision=bf16-mixed, or use model.loss_backend=chunked or liger"
            )

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        from cut_cross_entropy import linear_cross_entropy

        self.check_form(form, z_loss)
        hidden, weight, _ = _in_compute_dtype(form)
        loss = linear_cross_entropy(
            hidden, weight, targets, ignore_index=ignore_index, softcap=form.softcap, filter_eps=None
        )
        return TrainLoss(loss, loss.detach(), torch.zeros_like(loss.detach()))


BACKENDS: dict[str, type[LossBackend]] = {
    b.name: b for b in (NaiveBackend, ChunkedBackend, LigerBackend, CutCrossEntropyBackend)
}
#: What ``model.loss_backend`` accepts; ``auto`` is ``chunked`` on every device (tools/bench_head.py).
BackendName = Literal["auto", "naive", "chunked", "liger", "cce"]
CHOICES: tuple[str, ...] = get_args(BackendName)


def get_backend(name: str, chunk_size: int | None = None) -> LossBackend:
    """The backend called ``name`` (``auto``: ``chunked``); :meth:`LossBackend.check` says whether it
    runs on a device."""
    if name not in CHOICES:
        raise ConfigError(f"unknown loss backend {name!r}; choose one of: {', '.join(CHOICES)}")
    return BACKENDS["chunked" if name == "auto" else name](chunk_size)


class HeadLoss(ABC):
    """The loss of one head, chosen once when the module is built (:func:`head_loss`)."""

    name: str

    @abstractmethod
    def check(self, device: torch.device) -> None:
        """Raise a :class:`ConfigError` when this loss cannot run on ``device``."""

    @abstractmethod
    def train_loss(self, head: Head, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TrainLoss:
        """Mean training loss (NLL plus the head's z-loss) of hidden states (N, D) and targets (N,)."""

    @abstractmethod
    def token_loss(self, head: Head, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TokenLoss:
        """Per-token NLL and log-partition (N,)."""


class LinearHeadLoss(HeadLoss):
    """A linear head's form through a loss backend."""

    def __init__(self, backend: LossBackend) -> None:
        self.backend = backend
        self.name = backend.name

    def check(self, device: torch.device) -> None:
        self.backend.check(device)

    def train_loss(self, head: LinearHead, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TrainLoss:
        form = head.linear_form(h, embedding)
        return self.backend.train_loss(form, targets, IGNORE_INDEX, head.z_loss)

    def token_loss(self, head: LinearHead, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TokenLoss:
        return self.backend.token_loss(head.linear_form(h, embedding), targets, IGNORE_INDEX)


class FullLogitsLoss(HeadLoss):
    """Any head's full logits (N, V), then log-softmax in fp32."""

    name = "naive"

    def check(self, device: torch.device) -> None:
        return None  # plain PyTorch: any device

    def train_loss(self, head: Head, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TrainLoss:
        token = logits_token_loss(head.logits(h, embedding), targets, IGNORE_INDEX)
        return reduce_token_loss(token, targets, IGNORE_INDEX, head.z_loss)

    def token_loss(self, head: Head, h: Tensor, embedding: nn.Embedding, targets: Tensor) -> TokenLoss:
        return logits_token_loss(head.logits(h, embedding), targets, IGNORE_INDEX)


def head_loss(head: Head, backend: str, chunk_size: int | None = None) -> HeadLoss:
    """The loss for ``head``: the named backend for a linear head; the full logits for any other (with
    one warning when another backend was asked for)."""
    backend_object = get_backend(backend, chunk_size)  # a name it does not know is refused for any head
    if isinstance(head, LinearHead):
        return LinearHeadLoss(backend_object)
    if backend not in ("naive", "auto"):
        warnings.warn(
            f"head {head_name(head)!r} is not a linear form, so loss backend {backend!r} cannot serve it; "
            "it uses the full logits (naive) instead",
            stacklevel=2,
        )
    return FullLogitsLoss()
