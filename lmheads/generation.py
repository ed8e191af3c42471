"""Text generation: the sampling settings, the sampling loop, and the two places it is used (``predict``
writes samples to the run folder; after each validation a few samples go to TensorBoard's text tab)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lmheads.errors import ConfigError
from lmheads.sharding import fsdp1_root, gathers_collectively


@dataclass(frozen=True)
class SamplingConfig:
    """Text generation: ``predict`` continues the start of each test (or validation) block, and after
    each validation a few validation prompts are continued into TensorBoard's text tab.

    Args:
        prompt_tokens: Tokens of each block used as the prompt: at most ``model.backbone.block_size`` in
            ``predict``; the validation samples cut a longer prompt to the block.
        max_new_tokens: Tokens to generate after the prompt.
        temperature: Softmax temperature; 0 means greedy decoding.
        top_k: Sample only among the k most likely tokens (``None``: all).
        validation_samples: Samples written to TensorBoard after each validation (0: none).
    """

    prompt_tokens: int = 32
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    validation_samples: int = 2

    def __post_init__(self) -> None:
        if self.temperature < 0 or (self.top_k is not None and self.top_k <= 0):
            raise ConfigError("sampling needs temperature >= 0 and top_k > 0 (or null)")
        if self.prompt_tokens <= 0 or self.max_new_tokens <= 0 or self.validation_samples < 0:
            raise ConfigError(
                "sampling.prompt_tokens and sampling.max_new_tokens must be positive, validation_samples >= 0"
            )


@torch.no_grad()
def sample(
    next_logits: Callable[[Tensor], Tensor],
    idx: Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend prompts (B, T0) by ``max_new_tokens`` tokens; returns (B, T0 + max_new_tokens).

    ``next_logits`` maps a context (B, <=T) to the logits of the next token (B, V). The context is
    cropped to the last ``block_size`` tokens; no KV cache (sampling is for inspection, not serving)."""
    for _ in range(max_new_tokens):
        logits = next_logits(idx[:, -block_size:]).float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


@torch.no_grad()
def generate_tokens(
    model,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    logits_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Extend prompts (B, T0) by ``max_new_tokens`` tokens sampled from ``model`` (an
    :class:`~lmheads.module.LMHeadModule`, whose ``generate`` this is) with :func:`sample`.

    ``logits_fn`` maps a context (B, T) to full logits (B, T, V) instead of the module's own backbone
    and head: outside a step, FSDP1's root unit, which gathers the embedding and head around its
    forward."""

    def next_logits(context: Tensor) -> Tensor:
        if logits_fn is not None:
            return logits_fn(context)[:, -1]  # (B, V)
        return model.head.logits(model.backbone(context)[:, -1], model.backbone.wte)  # (B, V)

    return sample(next_logits, idx, max_new_tokens, model.cfg.block_size, temperature, top_k, generator)


class SampleWriter(BasePredictionWriter):
    """Writes ``predict`` output, decoded by the data module, to ``samples-rank<r>.jsonl`` in the
    command's folder (the trainer's ``default_root_dir``), and prints the first few samples."""

    def __init__(self, show: int = 3) -> None:
        super().__init__(write_interval="batch")
        self.show = show
        self._shown = 0
        self._folder: Path | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        # rank 0's folder, on every process: one started on its own (torchrun, SLURM, another node) may
        # have named the run or numbered the evaluation otherwise
        self._folder = Path(trainer.strategy.broadcast(trainer.default_root_dir))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        decode = getattr(trainer.datamodule, "decode", None) or (lambda ids: " ".join(map(str, ids)))
        path = self._folder / f"samples-rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            for prompt, completion in zip(
                prediction["prompt"].tolist(), prediction["completion"].tolist(), strict=True
            ):
                record = {"prompt": decode(prompt), "completion": decode(completion)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if self._shown < self.show:
                    rank_zero_info(f"--- sample {self._shown}\n{record['prompt']}[...]{record['completion']}")
                    self._shown += 1
        if batch_idx == 0:
            rank_zero_info(f"writing samples to {path}")


class TextSamples(Callback):
    """After each validation, continues the first ``sampling.validation_samples`` validation prompts and
    writes prompt and continuation to TensorBoard's text tab (``samples/<i>``).

    Sampling uses its own seeded generator: the samples of one step are comparable across heads and
    the training random state is left untouched (so resumed runs stay exact). Under FSDP every process
    generates (the root unit's parameters are gathered collectively) and rank 0 writes.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = pl_module.sampling
        datamodule = trainer.datamodule
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | WandbLogger)]
        if (
            trainer.sanity_checking
            or not (trainer.is_global_zero or gathers_collectively(pl_module))
            or not loggers
            or cfg.validation_samples == 0
        ):
            return
        blocks = datamodule.splits["validation"]
        n = min(cfg.validation_samples, len(blocks))
        device = pl_module.device
        prompts = torch.stack([blocks[i][0][: cfg.prompt_tokens] for i in range(n)]).to(device)  # (n, P)
        generator = torch.Generator(device=device).manual_seed(0)
        root = fsdp1_root(pl_module)  # FSDP1: through the root unit, which gathers embedding and head
        out = pl_module.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, root)
        if not trainer.is_global_zero:
            return
        rows = []
        for i in range(n):
            prompt = datamodule.decode(out[i, : prompts.size(1)].tolist())
            completion = datamodule.decode(out[i, prompts.size(1) :].tolist())
            rows.append([trainer.global_step, i, prompt, completion])
            text = f"**prompt** {_markdown_code(prompt)}\n\n**continuation** {_markdown_code(completion)}"
            for logger in loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(f"samples/{i}", text, trainer.global_step)
        for logger in loggers:  # W&B: one table a validation
            if isinstance(logger, WandbLogger):
                logger.log_text("samples", columns=["step", "sample", "prompt", "continuation"], data=rows)


def _markdown_code(text: str) -> str:
    """Text as a markdown code block, so whitespace and markup characters show as they are."""
    return "\n\n    " + text.replace("\n", "\n    ")
