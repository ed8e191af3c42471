"""Cross-entropy of a linear head, computed from the head's linear form (h', W, b, soft-cap).

Every head hands the loss the same tensors, so a loss backend is written once and serves all heads:

- ``naive``: the full (N, V) logits, upcast to fp32, then log-softmax. The reference the others are
  tested against.
- ``chunked``: tokens in chunks of C; each chunk's logits, loss and logit gradient are formed and
  consumed at once, so memory is O(C x V) instead of O(N x V). The gradients for h', W and b are
  computed in the forward pass (three matrix products in all, as for naive) and scaled by the incoming
  gradient in the backward pass. Pure PyTorch: runs on CPU and GPU and under ``torch.compile``.
- ``liger`` / ``cce``: the fused kernels of Liger-Kernel and Apple's Cut Cross-Entropy, when installed
  (CUDA only).
- ``auto``: ``chunked``, on every device (``tools/bench_head.py`` measures it against the others).

Training needs a scalar (mean NLL over counted tokens plus the z-loss); evaluation needs the NLL of
every token. Fused backends evaluate in chunks without gradients, so no path holds the full logits.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lmheads.errors import ConfigError
from lmheads.heads.base import LinearForm, apply_softcap

IGNORE_INDEX = -100
#: Default logit workspace of the chunked backend; the chunk length C follows from it and V.
CHUNK_WORKSPACE_BYTES = 256 * 2**20


class TokenLoss(NamedTuple):
    nll: Tensor  # (N,) -log p(target), 0 where the target is ignored
    lse: Tensor  # (N,) logsumexp of the logits


class TrainLoss(NamedTuple):
    loss: Tensor  # scalar to differentiate: mean NLL over counted tokens + the z-loss term
    nll: Tensor  # mean NLL, detached (what is logged as the training loss)
    z_loss: Tensor  # z-loss term, detached (0 without a coefficient)


# ------------------------------------------------------------------------------------ reference
def logits_token_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> TokenLoss:
    """Per-token NLL and log-partition from full logits (N, V), in fp32."""
    logits = logits.float()
    lse = logits.logsumexp(dim=-1)  # (N,)
    valid = targets != ignore_index
    target_logit = logits.gather(1, targets.where(valid, 0).unsqueeze(1)).squeeze(1)  # (N,)
    return TokenLoss((lse - target_logit) * valid, lse)


def naive_linear_cross_entropy(
    form: LinearForm, targets: Tensor, ignore_index: int = IGNORE_INDEX
) -> TokenLoss:
    """Full logits, upcast to fp32, then log-softmax."""
    logits = apply_softcap(F.linear(form.hidden, form.weight, form.bias).float(), form.softcap)  # (N, V)
    return logits_token_loss(logits, targets, ignore_index)


def reduce_token_loss(
    token: TokenLoss, targets: Tensor, ignore_index: int = IGNORE_INDEX, z_loss: float = 0.0
) -> TrainLoss:
    """Mean NLL over counted tokens plus ``z_loss`` times the mean squared log-partition (PaLM)."""
    valid = targets != ignore_index
    count = valid.sum().clamp_min(1)
    nll = token.nll.sum() / count
    z = z_loss * (token.lse.square() * valid).sum() / count if z_loss else torch.zeros_like(nll)
    return TrainLoss(nll + z, nll.detach(), z.detach())


# -------------------------------------------------------------------------------------- chunked
def chunk_tokens(vocab_size: int, workspace_bytes: int = CHUNK_WORKSPACE_BYTES) -> int:
    """Tokens per chunk so that a chunk's logits and their gradient (about 8 bytes per logit in
    mixed precision) fit ``workspace_bytes``; a multiple of 64, at least 64."""
    return max(64, workspace_bytes // (8 * vocab_size) // 64 * 64)


def _chunk_grad(
    logits: Tensor, targets: Tensor, valid: Tensor, softcap: float | None, z_loss: float
) -> tuple[Tensor, Tensor, Tensor]:
    """NLL, log-partition (C,) and the gradient of sum(nll + z_loss * lse^2) over counted tokens with
    respect to the uncapped logits (C, V), in the logits' dtype. ``logits`` is overwritten when fp32.

    d/dx [lse(x) - x_t + z lse(x)^2] = softmax(x) (1 + 2 z lse) - onehot(t), times the soft-cap's
    derivative 1 - tanh^2 when x = c tanh(l / c). Not divided by the token count, so fp16 logits keep
    their precision; the caller scales the products once.
    """
    x = logits.float()
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    lse = x.logsumexp(dim=-1)  # (C,)
    safe = targets.where(valid, 0).unsqueeze(1)  # (C, 1)
    nll = (lse - x.gather(1, safe).squeeze(1)) * valid
    weight = ((1 + 2 * z_loss * lse) * valid).unsqueeze(1)  # (C, 1)
    grad = x.sub_(lse.unsqueeze(1)).exp_().mul_(weight)  # softmax, weighted, in place
    grad.scatter_add_(1, safe, -valid.to(grad.dtype).unsqueeze(1))
    if tanh is not None:
        grad.mul_(1 - tanh.square_())
    return nll, lse, grad.to(logits.dtype)


#: Compiled per-chunk gradient for CUDA (one fused kernel instead of several passes over C x V);
#: False once compiling failed.
_compiled_chunk_grad = None


def _compiled_or_eager_chunk_grad(*args):
    global _compiled_chunk_grad
    if _compiled_chunk_grad is None:
        _compiled_chunk_grad = torch.compile(_chunk_grad, dynamic=False)
    if _compiled_chunk_grad is not False:
        try:
            return _compiled_chunk_grad(*args)
        except Exception as err:  # a missing or broken compiler toolchain must not stop training
            warnings.warn(
                f"compiling the chunked loss failed ({type(err).__name__}: {err}); it runs uncompiled",
                stacklevel=2,
            )
            _compiled_chunk_grad = False
    return _chunk_grad(*args)


def _chunk_grad_fn(device: torch.device, compile_chunks: bool | None):
    use = device.type == "cuda" if compile_chunks is None else compile_chunks
    if not use or torch.compiler.is_compiling():  # inside a compiled model the whole step is traced
        return _chunk_grad
    return _compiled_or_eager_chunk_grad


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, ignore_index, softcap, z_loss, chunk_size, dtype, compile_chunks
    ):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        valid = targets != ignore_index  # (N,)
        count = valid.sum().clamp_min(1)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all = hidden.to(dtype)  # (N, K)
            w = weight.to(dtype)  # (V, K)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if needs_h else None
            grad_w = torch.zeros_like(weight) if needs_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if needs_b else None
            nll_sum = hidden.new_zeros((), dtype=torch.float32)
            z_sum = hidden.new_zeros((), dtype=torch.float32)
            chunk_grad = _chunk_grad_fn(hidden.device, compile_chunks)
            for start in range(0, hidden.size(0), chunk_size):
                stop = min(start + chunk_size, hidden.size(0))
                h = h_all[start:stop]  # (C, K)
                logits = F.linear(h, w, b)  # (C, V)
                nll, lse, grad = chunk_grad(logits, targets[start:stop], valid[start:stop], softcap, z_loss)
                nll_sum += nll.sum()
                if z_loss:
                    z_sum += (lse.square() * valid[start:stop]).sum()
                if needs_h:
                    grad_h[start:stop] = grad @ w
                if needs_w:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(grad.t(), h)
                    else:  # fp32 parameters under autocast: products in the compute dtype, sums in fp32
                        grad_w += grad.t() @ h
                if needs_b:
                    grad_b += grad.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b, count)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        nll_mean = nll_sum / count
        z_term = z_loss * z_sum / count
        ctx.mark_non_differentiable(nll_mean, z_term)
        return nll_mean + z_term, nll_mean, z_term

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_z):
        grad_h, grad_w, grad_b, count = ctx.saved_tensors
        scale = grad_loss / count  # the products were summed over tokens, not averaged
        # In place: the saved gradients are this function's own buffers and are used once.
        grad_h = grad_h.mul_(scale) if grad_h is not None else None
        grad_w = grad_w.mul_(scale) if grad_w is not None else None
        grad_b = grad_b.mul_(scale).to(ctx.bias_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def chunked_train_loss(
    form: LinearForm,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    compile_chunks: bool | None = None,
) -> TrainLoss:
    """Mean NLL (+ z-loss) of a linear form without materialising the (N, V) logits.

    ``chunk_size`` tokens per chunk (default: :func:`chunk_tokens`); ``compile_chunks`` fuses the
    per-chunk softmax gradient with ``torch.compile`` (default: on CUDA).
    """
    hidden, weight, bias = form.hidden, form.weight, form.bias
    chunk = chunk_size or chunk_tokens(weight.size(0))
    dtype = _compute_dtype(hidden, weight)
    fn = _ChunkedLinearCrossEntropy
    loss, nll, z = fn.apply(
        hidden, weight, bias, targets, ignore_index, form.softcap, float(z_loss), chunk, dtype, compile_chunks
    )
    return TrainLoss(loss, nll, z)


@torch.no_grad()
def chunked_token_loss(
    form: LinearForm, targets: Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None
) -> TokenLoss:
    """Per-token NLL and log-partition (N,) in chunks, without gradients (evaluation): the reference
    loss on C tokens at a time."""
    chunk = chunk_size or chunk_tokens(form.weight.size(0))
    parts = [
        naive_linear_cross_entropy(
            form._replace(hidden=form.hidden[s : s + chunk]), targets[s : s + chunk], ignore_index
        )
        for s in range(0, form.hidden.size(0), chunk)
    ]
    return TokenLoss(torch.cat([p.nll for p in parts]), torch.cat([p.lse for p in parts]))


# ------------------------------------------------------------------------------------- backends
def _in_compute_dtype(form: LinearForm) -> tuple[Tensor, Tensor, Tensor | None]:
    """h', W, b cast to the autocast dtype: fused kernels compute in their inputs' dtype."""
    dtype = _compute_dtype(form.hidden, form.weight)
    bias = form.bias.to(dtype) if form.bias is not None else None
    return form.hidden.to(dtype), form.weight.to(dtype), bias


class LossBackend:
    """How training and evaluation compute the cross-entropy of a head's linear form."""

    name: ClassVar[str] = ""
    #: pip package and import name, for backends that come from another library.
    package: ClassVar[tuple[str, str] | None] = None
    cuda_only: ClassVar[bool] = False

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.device: torch.device | None = None  # where it was checked to run

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

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        return chunked_train_loss(form, targets, ignore_index, z_loss, self.chunk_size)

    def token_loss(self, form: LinearForm, targets: Tensor, ignore_index: int) -> TokenLoss:
        if torch.is_grad_enabled():  # a caller that differentiates per-token values gets the reference
            return naive_linear_cross_entropy(form, targets, ignore_index)
        return chunked_token_loss(form, targets, ignore_index, self.chunk_size)


class NaiveBackend(LossBackend):
    name = "naive"

    def train_loss(self, form: LinearForm, targets: Tensor, ignore_index: int, z_loss: float) -> TrainLoss:
        return reduce_token_loss(
            naive_linear_cross_entropy(form, targets, ignore_index), targets, ignore_index, z_loss
        )

    def token_loss(self, form: LinearForm, targets: Tensor, ignore_index: int) -> TokenLoss:
        return naive_linear_cross_entropy(form, targets, ignore_index)


class ChunkedBackend(LossBackend):
    name = "chunked"


class LigerBackend(LossBackend):
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


class CutCrossEntropyBackend(LossBackend):
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
        dtype = _compute_dtype(form.hidden, form.weight)
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
CHOICES = ("auto", *BACKENDS)


def check_backend_name(name: str) -> None:
    if name not in CHOICES:
        raise ConfigError(f"unknown loss backend {name!r}; choose one of: {', '.join(CHOICES)}")


def get_backend(name: str, device: torch.device, chunk_size: int | None = None) -> LossBackend:
    """The backend called ``name`` (or the one ``auto`` picks) for ``device``, checked to run there."""
    check_backend_name(name)
    if name == "auto":
        name = "chunked"
    backend = BACKENDS[name](chunk_size)
    backend.check(device)
    backend.device = device
    return backend
