"""What a run reports beyond its loss: parameter counts, the HParams row, the metrics derived from the
evaluation loss (perplexity, bits per byte, excess loss, loss per frequency bucket), the head
diagnostics after each validation, and where the tied embedding's gradient comes from."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lmheads.heads import LinearHead, head_name
from lmheads.metrics import (
    COUNT_BUCKETS,
    FREQUENCY_BUCKETS,
    HP_METRICS,
    bits_per_byte,
    bucket_loss_metric,
    count_loss_metric,
)
from lmheads.sharding import gathered


def parameter_counts(model) -> dict[str, int]:
    """Parameter counts of an :class:`~lmheads.module.LMHeadModule` in which a shared tensor counts once.

    ``total``: unique parameters of the whole model; ``token_embedding``: V x E; ``head_own``: parameters
    only the head has; ``head_shared``: embedding parameters the head reuses; ``non_embedding``: total
    minus token and position embeddings (Kaplan et al. 2020).
    """
    report = model.head.parameter_report(model.backbone.wte)
    total = sum(p.numel() for p in model.parameters())  # Module.parameters() yields each tensor once
    embedding = model.backbone.wte.weight.numel()
    positions = model.backbone.wpe.weight.numel() if model.backbone.wpe is not None else 0
    return {
        "total": total,
        "token_embedding": embedding,
        "head_own": report["own"],
        "head_shared": report["shared"],
        "non_embedding": total - embedding - positions,
    }


def flops_per_token(model) -> float:
    """Training FLOPs per token of an :class:`~lmheads.module.LMHeadModule`: 6 per weight of every
    matrix product (the blocks and the output projection; embedding lookups are not products; a block
    shared between layers counts at every layer it is applied) plus 12 L T D for the attention scores
    and values, not halved for the causal mask (PaLM, appendix B)."""
    cfg, head = model.cfg, model.head
    shape = (head.vocab_size, head.d_embed if head.shares_embedding else head.d_model)  # (V, K)
    own_output = sum(p.numel() for p in head.parameters() if tuple(p.shape) == shape)  # counted below
    matmul = parameter_counts(model)["non_embedding"] - own_output + shape[0] * shape[1]
    matmul += model.backbone.repeated_parameters()
    return 6 * matmul + 12 * cfg.n_layer * cfg.block_size * cfg.d_model


def tokens_per_step(model, trainer: L.Trainer, datamodule=None) -> int:
    """Training tokens per optimizer step, all devices and accumulated batches together (``datamodule``:
    the trainer's)."""
    batch_size = int(getattr(datamodule or trainer.datamodule, "batch_size", 0))
    return batch_size * model.cfg.block_size * trainer.world_size * trainer.accumulate_grad_batches


def training_settings(trainer: L.Trainer) -> dict[str, int | float | str]:
    """The trainer's settings a run records that change how it trains (or, the seed, its record)."""
    clip = float(trainer.gradient_clip_val or 0.0)
    algorithm = trainer.gradient_clip_algorithm  # None: by norm
    return {
        "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
        "precision": str(trainer.precision),
        "gradient_clip_val": clip,
        # "none" without clipping, where the choice changes nothing
        "gradient_clip_algorithm": (str(algorithm.value) if algorithm else "norm") if clip else "none",
    }


def flat_hparams(model, trainer: L.Trainer) -> dict[str, int | float | str]:
    """One flat dict with the same keys and types in every run (TensorBoard's HParams needs that)."""
    datamodule = trainer.datamodule
    data_hp = getattr(datamodule, "hparams", {})
    batch_size = int(getattr(datamodule, "batch_size", 0))
    cfg = model.cfg
    flat: dict[str, int | float | str] = {
        "head": head_name(model.head),
        "head_options": json.dumps(model.head.options(), sort_keys=True),
        "data": type(datamodule).__name__ if datamodule is not None else "none",
        "tokenizer": str(data_hp.get("tokenizer", "none")),
        "train_set_tokens": _train_set_tokens(datamodule),
        "vocab_size": model.backbone.vocab_size,
        "batch_size": batch_size,
        "devices": trainer.world_size,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "tokens_per_step": tokens_per_step(model, trainer),
        "max_steps": trainer.max_steps,
        "lr": model.hparams.lr,
        "weight_decay": model.hparams.weight_decay,
        "betas": ", ".join(f"{beta:g}" for beta in model.hparams.betas),
        "warmup_steps": model.hparams.warmup_steps,
        "lr_decay_steps": model.schedule_steps(),
        "min_lr_ratio": float(model.hparams.min_lr_ratio),
        "loss_backend": model.head_loss.name,
    }
    flat.update(training_settings(trainer))
    # The text trained and validated on, by content: two runs of files with one name and size, or of one
    # dataset name, but other text are not seeds of one configuration ("" where no text is read).
    sources = getattr(datamodule, "sources", {})
    for split in ("train", "validation"):
        flat[f"data/{split}_sha256"] = sources.get(f"{split}_file") or sources.get(f"{split}_text", "")
    for name, value in vars(cfg).items():
        flat[f"backbone/{name}"] = value
    flat["backbone/d_embed"] = cfg.embed_width  # one type in every run: E, also where it is D
    flat["backbone/unique_layers"] = cfg.n_unique_layers
    flat.update({f"params/{k}": v for k, v in parameter_counts(model).items()})
    flat["flops_per_token"] = int(flops_per_token(model))  # training FLOPs a token: 6 per applied weight
    return flat


def _train_set_tokens(datamodule) -> int:
    """Tokens in the training split (-1 when the data module does not say)."""
    counts = getattr(datamodule, "train_token_counts", None)
    if counts is None or "train" not in getattr(datamodule, "splits", {}):
        return -1
    return int(counts().sum())


def continues_in_place(trainer: L.Trainer) -> bool:
    """Whether this fit continues a run in the run's own folder (from one of its checkpoints)."""
    from lmheads.run.layout import run_of_checkpoint

    run = run_of_checkpoint(trainer.ckpt_path) if trainer.ckpt_path else None
    return run is not None and Path(run).resolve() == Path(trainer.default_root_dir).resolve()


def log_run_start(model, trainer: L.Trainer) -> None:
    """Print the parameter counts; give a new run its HParams row (every metric NaN until measured) and
    its parameter counts as scalars. A run continued in its folder has them already, from its start: at
    this point a continuation's schedule is not restored yet, and MLflow refuses a changed parameter."""
    counts = parameter_counts(model)
    rank_zero_info(
        f"head {head_name(model.head)}: parameters (a shared tensor counted once) "
        + ", ".join(f"{k}={v:,}" for k, v in counts.items())
    )
    if os.path.exists(os.path.join(trainer.default_root_dir, "hparams.yaml")) or continues_in_place(trainer):
        return
    flat = flat_hparams(model, trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HParams tab's columns, NaN until measured
            logger.log_hyperparams(flat, metrics=dict.fromkeys(hp_metrics(trainer.datamodule), math.nan))
        else:  # the other loggers take no metrics with them
            logger.log_hyperparams(flat)
        logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)


def hp_metrics(datamodule) -> list[str]:
    """The HParams columns a run's data defines: bits per byte for text (bytes known), excess loss for
    data with a known optimum (the synthetic language); loss, perplexity and throughput for any."""
    undefined = set()
    if not getattr(datamodule, "bytes_per_token", {}):
        undefined.add("hp/val_bpb")
    if not hasattr(datamodule, "optimal_loss"):
        undefined.add("hp/val_excess_loss")
    return [k for k in HP_METRICS if k not in undefined]


def eval_metrics(
    prefix: str,
    split: str,
    result: dict[str, Tensor],
    buckets: dict[str, Tensor] | None,
    datamodule,
    counts: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """What an evaluation logs besides ``<prefix>/loss``: perplexity, loss and token share per training
    frequency bucket and per training-count bucket (a count bucket no target falls in is left out),
    bits per byte (text data), the exact optimum and excess loss (synthetic data), and for validation
    the HParams columns where defined."""
    logs = {f"{prefix}/ppl": result["ppl"]}
    if buckets is not None:
        for i, name in enumerate(FREQUENCY_BUCKETS):
            logs[bucket_loss_metric(prefix, name)] = buckets["loss"][i]
            logs[f"{prefix}_freq/token_share_{name}"] = buckets["share"][i]
    if counts is not None:
        for i, name in enumerate(COUNT_BUCKETS):
            if counts["share"][i] > 0:
                logs[count_loss_metric(prefix, name)] = counts["loss"][i]
                logs[f"{prefix}_count/token_share_{name}"] = counts["share"][i]
    tokens = int(result["tokens"])  # the targets scored: all of the split's, or its first batches'
    # bits per byte takes the bytes of the text scored, known for a whole split only: not for its first
    # batches (trainer.limit_val_batches), whose bytes per token can differ from the split's mean
    bytes_per_token = getattr(datamodule, "bytes_per_token", {}).get(split)
    blocks = getattr(datamodule, "splits", {}).get(split)
    if blocks is not None and tokens < len(blocks) * datamodule.block_size:
        bytes_per_token = None
    if bytes_per_token:
        logs[f"{prefix}/bpb"] = bits_per_byte(result["loss"], bytes_per_token)
    optimum = datamodule.optimal_loss(split, tokens) if hasattr(datamodule, "optimal_loss") else None
    if optimum is not None:
        logs[f"{prefix}/optimal_loss"] = torch.tensor(optimum)
        logs[f"{prefix}/excess_loss"] = result["loss"] - optimum
    if prefix == "val":  # the HParams columns, where defined
        logs.update({"hp/val_loss": result["loss"], "hp/val_ppl": result["ppl"]})
        logs.update({f"hp/{k}": logs[k] for k in ("val/bpb", "val/excess_loss") if k in logs})
    return {k: torch.as_tensor(v).float() for k, v in logs.items()}


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
