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

A head that is not a linear form (:class:`~lmheads.heads.Head` without ``project``) always uses its full
logits: :func:`head_loss` chooses once, when the module is built.

Training needs a scalar (mean NLL over counted tokens plus the z-loss); evaluation needs the NLL of
every token. Fused backends evaluate in chunks without gradients, so no path holds the full logits.
"""

from lmheads.loss.backends import (
    BACKENDS,
    CHOICES,
    BackendName,
    ChunkedBackend,
    CutCrossEntropyBackend,
    FullLogitsLoss,
    HeadLoss,
    LigerBackend,
    LinearHeadLoss,
    LossBackend,
    NaiveBackend,
    get_backend,
    head_loss,
)
from lmheads.loss.chunked import (
    CHUNK_WORKSPACE_BYTES,
    ChunkGrad,
    chunk_tokens,
    chunked_token_loss,
    chunked_train_loss,
)
from lmheads.loss.reference import (
    IGNORE_INDEX,
    TokenLoss,
    TrainLoss,
    logits_token_loss,
    naive_linear_cross_entropy,
    reduce_token_loss,
)

__all__ = [
    "BACKENDS",
    "CHOICES",
    "CHUNK_WORKSPACE_BYTES",
    "IGNORE_INDEX",
    "BackendName",
    "ChunkGrad",
    "ChunkedBackend",
    "CutCrossEntropyBackend",
    "FullLogitsLoss",
    "HeadLoss",
    "LigerBackend",
    "LinearHeadLoss",
    "LossBackend",
    "NaiveBackend",
    "TokenLoss",
    "TrainLoss",
    "chunk_tokens",
    "chunked_token_loss",
    "chunked_train_loss",
    "get_backend",
    "head_loss",
    "logits_token_loss",
    "naive_linear_cross_entropy",
    "reduce_token_loss",
]
