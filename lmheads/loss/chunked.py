"""The chunked linear cross-entropy: tokens in chunks of C; each chunk's logits, loss and logit gradient
are formed and consumed at once, so memory is O(C x V) instead of O(N x V). The gradients for h', W and
b are computed in the forward pass (three matrix products in all, as for the reference) and scaled by
the incoming gradient in the backward pass. Pure PyTorch: runs on CPU and GPU and under
``torch.compile``.

Memory, step by step, for one chunk:
  1. its logits (C, V) in the compute dtype: the compiled step's only (C, V) buffer without a soft-cap;
  2. the softmax gradient is computed from them and written over them (the compiled step does both in
     one kernel; uncompiled, the steps in between need fp32 temporaries: ChunkGrad.bytes_per_logit);
  3. the gradients of h', W and b are read off that buffer by two matrix products and a sum;
  4. the buffer is freed before the next chunk's logits are formed, so only one chunk is ever held.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmheads.heads.base import LinearForm, at_least_fp32
from lmheads.loss.reference import IGNORE_INDEX, TokenLoss, TrainLoss, naive_linear_cross_entropy

#: Default logit workspace of the chunked backend; the chunk length C follows from it and V.
CHUNK_WORKSPACE_BYTES = 256 * 2**20


def chunk_tokens(
    vocab_size: int, bytes_per_logit: int = 8, workspace_bytes: int = CHUNK_WORKSPACE_BYTES
) -> int:
    """Tokens per chunk so that a chunk's ``bytes_per_logit`` (8: the full-logits loss of a chunk in
    mixed precision, as evaluation computes it) fit ``workspace_bytes``; a multiple of 64, at least 64."""
    return max(64, workspace_bytes // (bytes_per_logit * vocab_size) // 64 * 64)


def _chunk_grad(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    softcap: float | None,
    z_loss: float,
    onehot_by_compare: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """NLL, log-partition (C,) and the gradient of sum(nll + z_loss * lse^2) over counted tokens with
    respect to the uncapped logits (C, V), written over ``logits`` (the third value is ``logits``).

    d/dx [lse(x) - x_t + z lse(x)^2] = softmax(x) (1 + 2 z lse) - onehot(t), times the soft-cap's
    derivative 1 - tanh^2 when x = c tanh(l / c). Not divided by the token count, so fp16 logits keep
    their precision; the caller scales the products once.

    The one-hot is subtracted by a scatter (eager: C writes), or with ``onehot_by_compare`` as an
    elementwise comparison with the column index, which a compiler fuses with the softmax into one pass
    over C x V where a scatter would need the fp32 gradient written out and read back. Both subtract
    the same numbers: the results are equal.
    """
    x = at_least_fp32(logits)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    lse = x.logsumexp(dim=-1)  # (C,)
    safe = targets.where(valid, 0).unsqueeze(1)  # (C, 1)
    nll = (lse - x.gather(1, safe).squeeze(1)) * valid
    weight = ((1 + 2 * z_loss * lse) * valid).unsqueeze(1)  # (C, 1)
    grad = x.sub_(lse.unsqueeze(1)).exp_().mul_(weight)  # softmax, weighted, in place
    if onehot_by_compare:
        hit = (torch.arange(grad.size(1), device=grad.device) == safe) & valid.unsqueeze(1)  # (C, V)
        grad = grad - hit.to(grad.dtype)
    else:
        grad.scatter_add_(1, safe, -valid.to(grad.dtype).unsqueeze(1))
    if tanh is not None:
        grad.mul_(1 - tanh.square_())
    if grad is not logits:  # compiled, the gradient's kernel stores into the logits' buffer directly
        logits.copy_(grad)
    return nll, lse, logits


class ChunkGrad:
    """How each chunk's step runs: its softmax gradient, and the sum of the fp32 gradient of W.

    ``compile``: the softmax gradient compiled into one kernel instead of several passes over C x V
    (default: on CUDA). When compiling fails (a missing or broken compiler toolchain) it warns once and
    runs uncompiled from then on. ``onehot``: how the target's one is subtracted, ``"scatter"`` or
    ``"compare"`` (see :func:`_chunk_grad`; default: compare where compiled, scatter in eager).

    ``fp32_out_gemm``: with fp32 parameters under autocast, each chunk adds its product grad^T h (V, K)
    to W's fp32 gradient. With it, one GEMM of bf16/fp16 operands writes its fp32 sum into the
    accumulator (``torch.addmm`` with ``out_dtype``, CUDA only, and more exact: the product is not
    rounded to bf16 first); without it the product is formed in the compute dtype, then added, which
    writes and reads back a (V, K) temporary per chunk. Default: on CUDA, except inside a compiled
    graph; where the operator is missing it warns once and adds instead.
    """

    def __init__(
        self,
        compile: bool | None = None,
        onehot: Literal["scatter", "compare"] | None = None,
        fp32_out_gemm: bool | None = None,
    ) -> None:
        if onehot not in (None, "scatter", "compare"):
            raise ValueError(f"onehot must be 'scatter', 'compare' or None, not {onehot!r}")
        self.compile = compile
        self.onehot = onehot
        self.fp32_out_gemm = fp32_out_gemm
        self._compiled = None  # the compiled function, made at the first compiled call
        self._failed = False
        self._gemm_failed = False

    def __call__(self, logits: Tensor, targets: Tensor, valid: Tensor, softcap: float | None, z_loss: float):
        if not self._compiles(logits.device) or torch.compiler.is_compiling():  # a compiled model traces it
            compare = self._by_compare(compiled=torch.compiler.is_compiling())
            return _chunk_grad(logits, targets, valid, softcap, z_loss, compare)
        if self._compiled is None:
            compare = self._by_compare(compiled=True)
            self._compiled = torch.compile(partial(_chunk_grad, onehot_by_compare=compare), dynamic=False)
        try:
            return self._compiled(logits, targets, valid, softcap, z_loss)
        except Exception as err:
            warnings.warn(
                f"compiling the chunked loss failed ({type(err).__name__}: {err}); it runs uncompiled",
                stacklevel=2,
            )
            self._failed = True
            return _chunk_grad(logits, targets, valid, softcap, z_loss, self._by_compare(compiled=False))

    def _compiles(self, device: torch.device) -> bool:
        """Whether the step runs compiled on ``device`` (on its own, not traced into a compiled model)."""
        use = device.type == "cuda" if self.compile is None else self.compile
        return use and not self._failed

    def _by_compare(self, compiled: bool) -> bool:
        return self.onehot == "compare" or (self.onehot is None and compiled)

    def bytes_per_logit(self, dtype: torch.dtype, device: torch.device, softcap: bool) -> int:
        """What a chunk's step holds at its peak per logit (see the module's docstring), at most.

        Compiled: the logits in ``dtype``, which the gradient overwrites, and with a soft-cap its tanh in
        fp32. Uncompiled: also the fp32 working copy of lower-precision logits, the fp32 temporary of
        ``logsumexp``, and with a soft-cap two fp32 temporaries (float64 ones for float64 logits).
        (Measured by tests/test_loss.py.)
        """
        wide = max(dtype.itemsize, 4)  # the softmax's dtype: fp32, or float64
        cap = wide if softcap else 0
        if self._compiles(device) or torch.compiler.is_compiling():
            return dtype.itemsize + cap
        return dtype.itemsize + wide + (4 if dtype.itemsize < 4 else 0) + 2 * cap

    def chunk_tokens(self, vocab_size: int, dtype: torch.dtype, device: torch.device, softcap: bool) -> int:
        """The default chunk length: a chunk's step fills the 256 MiB workspace."""
        return chunk_tokens(vocab_size, self.bytes_per_logit(dtype, device, softcap))

    def add_product(self, acc: Tensor, a: Tensor, b: Tensor) -> None:
        """``acc += a @ b`` for an fp32 ``acc`` and ``a``, ``b`` in a lower compute dtype."""
        use = acc.device.type == "cuda" if self.fp32_out_gemm is None else self.fp32_out_gemm
        if use and not self._gemm_failed and not torch.compiler.is_compiling():
            try:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                return
            except (TypeError, RuntimeError) as err:  # an older torch, or no kernel (NotImplementedError)
                warnings.warn(
                    f"a GEMM with fp32 output is not available here ({type(err).__name__}: "
                    f"{str(err).splitlines()[0]}); the chunked loss adds each product instead",
                    stacklevel=3,
                )
                self._gemm_failed = True
        acc += a @ b


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, ignore_index, softcap, z_loss, chunk_size, dtype, chunk_grad
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
            acc = torch.promote_types(dtype, torch.float32)  # the sums' dtype: fp32, or float64
            grad_b = torch.zeros_like(bias, dtype=acc) if needs_b else None
            nll_sum = hidden.new_zeros((), dtype=acc)
            z_sum = hidden.new_zeros((), dtype=acc)
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
                        chunk_grad.add_product(grad_w, grad.t(), h)
                if needs_b:
                    grad_b += grad.sum(0, dtype=acc)
                del logits, grad  # one buffer, freed before the next chunk's logits are formed
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
    chunk_grad: ChunkGrad | None = None,
) -> TrainLoss:
    """Mean NLL (+ z-loss) of a linear form without materialising the (N, V) logits.

    ``chunk_size`` tokens per chunk (default: :meth:`ChunkGrad.chunk_tokens`, a 256 MiB workspace);
    ``chunk_grad`` computes each chunk's softmax gradient (default: a :class:`ChunkGrad` that compiles
    it on CUDA).
    """
    hidden, weight, bias = form.hidden, form.weight, form.bias
    dtype = compute_dtype(hidden, weight)
    chunk_grad = chunk_grad or ChunkGrad()
    softcap = form.softcap is not None
    chunk = chunk_size or chunk_grad.chunk_tokens(weight.size(0), dtype, hidden.device, softcap)
    loss, nll, z = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, form.softcap, float(z_loss), chunk, dtype, chunk_grad
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
