"""What the output layer looks like while it trains: the head's output matrix and bias described after
each validation, and where the tied embedding's gradient comes from (its input and output sides)."""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn

from lmheads.heads import LinearHead
from lmheads.metrics import FREQUENCY_BUCKETS
from lmheads.sharding import gathered


class HeadDiagnostics(L.Callback):
    """After each validation, describes a linear head's effective output matrix W and bias b.

    For every linear head: norms of the output rows (mean, std, and mean per training-frequency bucket).
    For heads whose W is not the embedding E itself: the cosine similarity of each W row to the same
    token's E row. For heads with a bias: its mean, spread, range and correlation with the log of the
    training frequency (a bias that learns the unigram distribution correlates strongly). Scalars go to
    ``diag/...``; with TensorBoard, the per-token distributions also go to its histograms.
    """

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(pl_module.head, LinearHead):
            return  # a head that is not linear has no single output matrix to describe
        with gathered(pl_module):  # sharded: every process gathers the embedding and head, then describes
            self._describe(trainer, pl_module)

    def _describe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        embedding = pl_module.backbone.wte
        head = pl_module.head
        probe = torch.zeros(1, head.d_model, device=embedding.weight.device, dtype=embedding.weight.dtype)
        form = head.linear_form(probe, embedding)
        weight = form.weight.float()  # (V, K)
        distributions: dict[str, Tensor] = {"row_norm": weight.norm(dim=1)}  # (V,)
        if form.weight is not embedding.weight and weight.shape == embedding.weight.shape:
            distributions["cos_to_embedding"] = torch.cosine_similarity(
                weight, embedding.weight.float(), dim=1
            )
        if form.bias is not None:
            distributions["bias"] = form.bias.float()
        scalars: dict[str, float | Tensor] = {}
        for name, values in distributions.items():
            scalars[f"diag/{name}_mean"] = values.mean()
            scalars[f"diag/{name}_std"] = values.std()
        if "bias" in distributions:
            scalars["diag/bias_min"] = distributions["bias"].min()
            scalars["diag/bias_max"] = distributions["bias"].max()
        bucket = pl_module.token_bucket
        if bucket is not None:
            bucket = bucket.to(weight.device)
            for i, name in enumerate(FREQUENCY_BUCKETS):
                scalars[f"diag/row_norm_mean_{name}"] = distributions["row_norm"][bucket == i].mean()
            counts = getattr(trainer.datamodule, "train_token_counts", None)
            if "bias" in distributions and counts is not None:
                log_freq = torch.log1p(torch.as_tensor(counts(), dtype=torch.float32, device=weight.device))
                scalars["diag/bias_corr_log_freq"] = torch.corrcoef(
                    torch.stack((distributions["bias"], log_freq))
                )[0, 1]
        pl_module.log_dict({k: torch.as_tensor(v).float() for k, v in scalars.items()}, rank_zero_only=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, values in distributions.items():
                        logger.experiment.add_histogram(f"diag/{name}", values.cpu(), trainer.global_step)
                elif isinstance(logger, WandbLogger):
                    import wandb

                    histograms = {
                        f"diag/{n}": wandb.Histogram(v.float().cpu().numpy())
                        for n, v in distributions.items()
                    }
                    logger.experiment.log({**histograms, "trainer/global_step": trainer.global_step})


class EmbeddingGradientTap:
    """The gradient on the token embedding E from its two uses, captured separately in one backward
    pass: through the input lookup and through the output side (a head whose W is E or a function of
    it). :meth:`output_share` is the fraction of the squared gradient norm that comes through the
    output side, ``|g_out|^2 / (|g_in|^2 + |g_out|^2)``: Lopardo et al. (2026) trace a tied matrix's
    drift towards the output space to this share being high early in training.

    Use :meth:`input_side` around the forward pass and hand :attr:`output_side` to the head's loss as
    its embedding; after the backward pass, :meth:`output_share` (a tensor: no host synchronisation).
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding
        self.input_grad: Tensor | None = None  # (V, E)
        self.output_grad: Tensor | None = None  # (V, E)
        self.output_side = _OutputSide(self)

    @contextlib.contextmanager
    def input_side(self):
        """Capture the gradient of the lookups made inside this block, summed into E's rows."""

        def on_lookup(module: nn.Embedding, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            idx = inputs[0].flatten()

            def on_grad(grad: Tensor) -> None:
                rows = torch.zeros_like(module.weight).index_add_(0, idx, grad.reshape(idx.numel(), -1))
                self.input_grad = rows if self.input_grad is None else self.input_grad + rows

            if output.requires_grad:
                output.register_hook(on_grad)

        handle = self.embedding.register_forward_hook(on_lookup)
        try:
            yield
        finally:
            handle.remove()

    def _on_output_grad(self, grad: Tensor) -> None:
        self.output_grad = grad if self.output_grad is None else self.output_grad + grad

    def output_share(self) -> Tensor | None:
        if self.input_grad is None and self.output_grad is None:
            return None
        squares = [
            g.float().square().sum() if g is not None else None for g in (self.input_grad, self.output_grad)
        ]
        zero = next(s for s in squares if s is not None) * 0
        inp, out = (s if s is not None else zero for s in squares)
        return out / (inp + out).clamp_min(torch.finfo(torch.float32).tiny)


class _OutputSide:
    """What a head reads as the embedding while tapped: ``weight`` is an alias of E whose gradient (the
    output side's) is recorded; made when read, so a sharded E is read after it was gathered."""

    def __init__(self, tap: EmbeddingGradientTap) -> None:
        self._tap = tap

    @property
    def weight(self) -> Tensor:
        weight = self._tap.embedding.weight
        alias = weight.view_as(weight)
        if alias.requires_grad:
            alias.register_hook(self._tap._on_output_grad)
        return alias


class _TappedLoss:
    """A head's loss that hands the head the tap's output side as its embedding (training only)."""

    def __init__(self, loss, output_side: _OutputSide) -> None:
        self.loss, self.output_side = loss, output_side

    def train_loss(self, head, h: Tensor, embedding: nn.Embedding, targets: Tensor):
        return self.loss.train_loss(head, h, self.output_side, targets)

    def __getattr__(self, name: str):
        return getattr(self.loss, name)


class GradientShare(L.Callback):
    """Logs ``diag/grad_share_output`` at the steps Lightning writes, for a head that reads the token
    embedding E (:class:`EmbeddingGradientTap`): the tap wraps the step's forward, the module's head loss
    reads E's output side through it for that step, and the share is read after the backward pass. A
    compiled model is not tapped."""

    def __init__(self) -> None:
        self._tap: EmbeddingGradientTap | None = None
        self._input_side: contextlib.ExitStack | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if not (
            pl_module.logging_step()
            and pl_module.head.shares_embedding
            and not pl_module.hparams.get("compile")
        ):
            return
        self._tap = EmbeddingGradientTap(pl_module.backbone.wte)
        self._input_side = contextlib.ExitStack()
        self._input_side.enter_context(self._tap.input_side())
        pl_module.head_loss = _TappedLoss(pl_module.head_loss, self._tap.output_side)

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        tap = self._close(pl_module)
        share = tap.output_share() if tap is not None else None
        if share is not None:
            pl_module.log("diag/grad_share_output", share)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, *args) -> None:
        self._close(pl_module)  # a step without a backward pass (skipped): nothing to read

    def _close(self, pl_module) -> EmbeddingGradientTap | None:
        tap, self._tap = self._tap, None
        if tap is not None:
            self._input_side.close()
            pl_module.head_loss = pl_module.head_loss.loss
        return tap
