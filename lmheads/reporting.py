"""What a run reports beyond its loss: parameter counts, the HParams row and the metrics derived from
the evaluation loss (perplexity, bits per byte, excess loss, loss per frequency bucket). What the head
looks like while it trains is in :mod:`lmheads.diagnostics`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lmheads.heads import head_name
from lmheads.metrics import (
    COUNT_BUCKETS,
    FREQUENCY_BUCKETS,
    HP_METRICS,
    bits_per_byte,
    bucket_loss_metric,
    count_loss_metric,
)


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
        logs.update({f"hp/val_{k}": logs[f"val/{k}"] for k in ("bpb", "excess_loss") if f"val/{k}" in logs})
    return {k: torch.as_tensor(v).float() for k, v in logs.items()}
