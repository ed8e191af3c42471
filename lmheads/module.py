"""The LightningModule: a decoder backbone, a swappable head and one loss for every head."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lmheads.backbone import Backbone, BackboneConfig
from lmheads.callbacks import HeadDiagnostics, InterruptCheckpoint, SampleWriter, TextSamples, TokenThroughput
from lmheads.errors import ConfigError, NonFiniteLossError
from lmheads.heads import Head, TiedHead, head_from_spec, head_name
from lmheads.loss import (
    IGNORE_INDEX,
    LossBackend,
    TokenLoss,
    TrainLoss,
    check_backend_name,
    get_backend,
    logits_token_loss,
    reduce_token_loss,
)
from lmheads.metrics import FREQUENCY_BUCKETS, BucketedNLL, TokenNLL, bits_per_byte, frequency_buckets
from lmheads.sharding import check_strategy, fsdp1_root, is_sharded, shard, unwrapped_name

#: Metrics shown in TensorBoard's HParams tab; every run logs all of them (NaN where not applicable) so
#: that runs line up as columns.
HP_METRICS = ("hp/val_loss", "hp/val_ppl", "hp/val_bpb", "hp/val_excess_loss", "hp/tokens_per_sec")

# Evaluation metrics are reduced across processes (torchmetrics) before they are logged, and the head
# diagnostics come from weights equal on every process: Lightning's advice to log them with sync_dist
# would only average equal numbers, once per metric and process.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test|hp|diag)")


@dataclass(frozen=True)
class SamplingConfig:
    """Text generation: ``predict`` continues the start of each test (or validation) block, and after
    each validation a few validation prompts are continued into TensorBoard's text tab.

    Args:
        prompt_tokens: Tokens of each block used as the prompt.
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


def warmup_cosine(step: int, warmup: int, total: float, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LMHeadModule(L.LightningModule):
    """Decoder-only language model with a swappable output head.

    Args:
        head: The output head (``class_path``/``init_args``, or a short name on the command line such
            as ``--model.head=untied``). Default: ``tied``. Checkpoints store it as ``class_path`` and
            ``init_args``, which rebuild it on loading.
        backbone: Sizes of the decoder backbone.
        vocab_size: Vocabulary size V; the CLI takes it from the data module.
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay on matrices and embeddings (not on biases and norms).
        betas: AdamW betas.
        warmup_steps: Linear warmup steps; then cosine decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        loss_backend: How the head's cross-entropy is computed: ``naive`` (full logits), ``chunked``
            (never holds the full logits), ``liger`` or ``cce`` (fused CUDA kernels, when installed), or
            ``auto`` (``chunked``). A head that is not a linear form always uses the full logits.
        loss_chunk_size: Tokens per chunk for ``chunked`` (default: a 256 MiB logit workspace).
        compile: Compile the backbone, head and loss with ``torch.compile`` (``true`` for the default
            backend, or a backend name such as ``aot_eager``). Parameters keep their names.

    Generation settings for ``predict`` live in ``self.sampling`` (a :class:`SamplingConfig`), not in the
    checkpoint: the CLI sets them from ``--sampling.*``.
    """

    def __init__(
        self,
        head: Head | None = None,
        backbone: BackboneConfig = BackboneConfig(),
        vocab_size: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        loss_backend: str = "auto",
        loss_chunk_size: int | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        # A checkpoint stores plain types: the head as its spec, the backbone as a dict.
        if isinstance(head, dict):
            head = head_from_spec(head)
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        with warnings.catch_warnings():
            # Outside the CLI `head` is a module; it is replaced by its spec just below.
            warnings.filterwarnings("ignore", message="Attribute 'head' is an instance of `nn.Module`")
            self.save_hyperparameters(logger=False)
        if isinstance(self.hparams.get("head"), Head):
            self.hparams["head"] = self.hparams["head"].spec()
        if isinstance(self.hparams.get("backbone"), BackboneConfig):
            self.hparams["backbone"] = asdict(self.hparams["backbone"])
        if vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size must be positive, got {vocab_size}; the CLI sets it from the data module, "
                "and code that builds the module directly must pass it"
            )
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(
                "need model.lr > 0, weight_decay >= 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1"
            )
        head = TiedHead() if head is None else head
        if not isinstance(head, Head):
            raise ConfigError(f"model.head must be an lmheads.heads.Head, got {type(head).__name__}")
        self.cfg = backbone
        self.sampling = SamplingConfig()
        # Backbone first, then the head: for one seed the backbone starts identical whatever the head.
        self.backbone = Backbone(vocab_size, self.cfg)
        self.head = head
        self.head.build(vocab_size, self.cfg.d_model, self.cfg.embed_width)
        # Weight decay by name, decided before any wrapper reshapes the parameters (FSDP1 with
        # use_orig_params shows each one as a 1-D view of its shard).
        self._decay_names = frozenset(n for n, p in self.named_parameters() if p.ndim >= 2)
        check_backend_name(loss_backend)
        if loss_chunk_size is not None and loss_chunk_size <= 0:
            raise ConfigError(f"model.loss_chunk_size must be positive or null, got {loss_chunk_size}")
        self._backend: LossBackend | None = None
        self.eval_nll = nn.ModuleDict({"val": TokenNLL(), "test": TokenNLL()})
        self.eval_buckets = nn.ModuleDict({"val": BucketedNLL(), "test": BucketedNLL()})
        self._token_bucket: Tensor | None = None  # (V,) frequency bucket of each token id
        self.register_buffer("_first_nonfinite_step", torch.tensor(-1), persistent=False)
        # Compiling a bound method (not assigning a compiled module) keeps the state-dict keys unchanged.
        self._compiled = None
        if compile:
            backend = "inductor" if compile is True else compile
            self._compiled = {
                "train": torch.compile(self._train_loss, backend=backend),
                "eval": torch.compile(self._token_loss, backend=backend),
            }

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy: FSDP2, with the embedding, final norm and head in the
        root unit so that a tie stays a tie (:func:`lmheads.sharding.shard`). Nothing otherwise."""
        if self.device_mesh is not None and not is_sharded(self):
            shard(self, self.device_mesh)

    def forward(self, idx: Tensor) -> Tensor:
        """Full logits (B, T, V) for token ids (B, T)."""
        return self.head.logits(self.backbone(idx), self.backbone.wte)

    def resolve_loss_backend(self) -> LossBackend:
        """The loss backend for the module's current device (``auto`` resolved, availability checked)."""
        backend = self._backend
        if backend is None or backend.device != self.device:
            name = self.hparams.loss_backend
            if not self.head.is_linear and name not in ("naive", "auto"):
                rank_zero_warn(
                    f"head {head_name(self.head)!r} is not a linear form, so loss backend {name!r} cannot "
                    "serve it; it uses the full logits (naive) instead"
                )
            backend = get_backend(name, self.device, self.hparams.loss_chunk_size)
            self._backend = backend
        return backend

    def train_loss(self, idx: Tensor, targets: Tensor) -> TrainLoss:
        """Mean training loss (NLL plus the head's z-loss) of a batch, through the loss backend."""
        self.resolve_loss_backend()  # outside the compiled region
        return (self._compiled["train"] if self._compiled else self._train_loss)(idx, targets)

    def token_loss(self, idx: Tensor, targets: Tensor) -> TokenLoss:
        """Per-token NLL and log-partition (B*T,). Without gradients, fused backends never hold the
        full logits."""
        self.resolve_loss_backend()
        return (self._compiled["eval"] if self._compiled else self._token_loss)(idx, targets)

    def _train_loss(self, idx: Tensor, targets: Tensor) -> TrainLoss:
        h = self.backbone(idx).flatten(0, 1)  # (N, D)
        flat = targets.flatten()
        if not self.head.is_linear:
            token = logits_token_loss(self.head.logits(h, self.backbone.wte), flat, IGNORE_INDEX)
            return reduce_token_loss(token, flat, IGNORE_INDEX, self.head.z_loss)
        form = self.head.linear_form(h, self.backbone.wte)
        return self._backend.train_loss(form, flat, IGNORE_INDEX, self.head.z_loss)

    def _token_loss(self, idx: Tensor, targets: Tensor) -> TokenLoss:
        h = self.backbone(idx).flatten(0, 1)  # (N, D)
        if not self.head.is_linear:
            return logits_token_loss(self.head.logits(h, self.backbone.wte), targets.flatten(), IGNORE_INDEX)
        form = self.head.linear_form(h, self.backbone.wte)
        return self._backend.token_loss(form, targets.flatten(), IGNORE_INDEX)

    def token_nll(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Per-token NLL (B*T,); 0 where the target is ignored."""
        return self.token_loss(idx, targets).nll

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        logits_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Extend prompts (B, T0) by ``max_new_tokens`` sampled tokens; returns (B, T0 + max_new_tokens).

        The context is cropped to the last ``block_size`` tokens; no KV cache (sampling is for
        inspection, not serving). ``logits_fn`` maps a context (B, T) to full logits (B, T, V) instead of
        the module's own backbone and head: outside a step, FSDP1's root unit, which gathers the
        embedding and head around its forward."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size :]  # (B, <=T)
            if logits_fn is not None:
                logits = logits_fn(context)[:, -1].float()  # (B, V)
            else:
                h = self.backbone(context)[:, -1]  # (B, D)
                logits = self.head.logits(h, self.backbone.wte).float()  # (B, V)
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

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        idx, _ = batch
        prompt = idx[:, : self.sampling.prompt_tokens]  # (B, P)
        out = self.generate(
            prompt, self.sampling.max_new_tokens, self.sampling.temperature, self.sampling.top_k
        )
        return {"prompt": prompt, "completion": out[:, prompt.size(1) :]}

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts in which a shared tensor counts once.

        ``total``: unique parameters of the whole model; ``token_embedding``: V x E;
        ``head_own``: parameters only the head has; ``head_shared``: embedding parameters the head
        reuses; ``non_embedding``: total minus token and position embeddings (Kaplan et al. 2020).
        """
        report = self.head.parameter_report(self.backbone.wte)
        total = sum(p.numel() for p in self.parameters())  # Module.parameters() yields each tensor once
        embedding = self.backbone.wte.weight.numel()
        positions = self.backbone.wpe.weight.numel() if self.backbone.wpe is not None else 0
        return {
            "total": total,
            "token_embedding": embedding,
            "head_own": report["own"],
            "head_shared": report["shared"],
            "non_embedding": total - embedding - positions,
        }

    # ------------------------------------------------------------- training
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        total = self.trainer.estimated_stepping_batches  # accounts for max_steps, epochs and accumulation
        total = int(total) if math.isfinite(total) else -1
        if self.head.on_train_step(self.global_step, total, self.backbone.wte):
            rank_zero_info(f"head {head_name(self.head)} changed its parameters at step {self.global_step}")
            for optimizer in self.trainer.optimizers:  # their moments describe the old parameters
                for p in self.head.parameters():
                    optimizer.state.pop(p, None)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Checked every step on CPU (free) and at the logging interval on GPU (one sync per interval).
        if self.device.type != "cuda" or self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self._check_finite()

    def _check_finite(self) -> None:
        step = int(self._first_nonfinite_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at step {step}; training stopped and no "
                "checkpoint of that state was written (the last good one is in the run's checkpoints "
                "folder). Lower model.lr, raise warmup_steps, try bf16-mixed instead of 16-mixed, or set a "
                "head softcap or z_loss"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._check_finite()  # never write a checkpoint of a diverged model
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["lmheads_rng"] = {  # tensors and plain types only: loadable with weights_only=True
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" in checkpoint:  # absent under FSDP2, whose strategy has already loaded the weights
            self.check_compatible(checkpoint["state_dict"])
        rng = checkpoint.get("lmheads_rng")
        if rng is not None and self._trainer is not None:  # resuming: continue the random streams exactly
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                # One state per device visible when saving; resuming may see fewer (or more) devices.
                for device, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(state, device)
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])

    def check_compatible(self, state: dict) -> None:
        """A clear message instead of a size-mismatch traceback when a checkpoint belongs to another model."""
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        problems = []
        if own.get("backbone.wte.weight") != theirs.get("backbone.wte.weight"):
            problems.append(
                f"token embedding {theirs.get('backbone.wte.weight')} in the checkpoint, "
                f"{own.get('backbone.wte.weight')} here (another vocabulary or embedding width?)"
            )
        missing = sorted(k for k in own if k not in theirs)
        unexpected = sorted(k for k in theirs if k not in own)
        if missing or unexpected:
            problems.append(
                f"parameters missing from the checkpoint: {missing or 'none'}; not in this model: "
                f"{unexpected or 'none'} (another head or backbone?)"
            )
        shapes = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k] and "wte" not in k)
        if shapes:
            problems.append(f"shapes differ for {shapes}")
        if problems:
            raise ConfigError(
                f"the checkpoint does not fit this model (head {head_name(self.head)!r}): "
                + "; ".join(problems)
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        idx, targets = batch
        out = self.train_loss(idx, targets)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if every and (self.global_step + 1) % every == 0:  # the steps Lightning writes; self.log is not free
            self.log("train/loss", out.nll, prog_bar=True)
            if self.head.z_loss > 0:  # PaLM (Chowdhery et al. 2022, sec. 5): keeps log Z near 0
                self.log("train/z_loss", out.z_loss)
        # Remember the first non-finite step on the device: no host sync in the step itself.
        bad = ~torch.isfinite(out.loss) & (self._first_nonfinite_step < 0)
        self._first_nonfinite_step = torch.where(bad, self.global_step, self._first_nonfinite_step)
        return out.loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        idx, targets = batch
        nll = self.token_nll(idx, targets)
        flat = targets.flatten()
        mask = flat != IGNORE_INDEX
        self.eval_nll[prefix].update(nll, mask)
        if self._token_bucket is not None:
            self._token_bucket = self._token_bucket.to(flat.device)
            self.eval_buckets[prefix].update(nll, self._token_bucket[flat.clamp_min(0)], mask)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", "validation")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", "test")

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        datamodule = self._datamodule()
        if datamodule is not None and "train" in getattr(datamodule, "splits", {}):
            self._token_bucket = frequency_buckets(datamodule.train_token_counts())

    def _log_eval(self, prefix: str, split: str) -> None:
        result = self.eval_nll[prefix].compute()  # already reduced over processes
        self.eval_nll[prefix].reset()
        self.log(f"{prefix}/loss", result["loss"].float(), prog_bar=True)
        logs = {f"{prefix}/ppl": result["ppl"]}
        if self._token_bucket is not None:
            buckets = self.eval_buckets[prefix].compute()
            self.eval_buckets[prefix].reset()
            for i, name in enumerate(FREQUENCY_BUCKETS):
                logs[f"{prefix}_freq/loss_{name}"] = buckets["loss"][i]
                logs[f"{prefix}_freq/token_share_{name}"] = buckets["share"][i]
        datamodule = self._datamodule()
        bytes_per_token = getattr(datamodule, "bytes_per_token", {}).get(split)
        bpb = bits_per_byte(result["loss"], bytes_per_token) if bytes_per_token else torch.tensor(math.nan)
        if bytes_per_token:
            logs[f"{prefix}/bpb"] = bpb
        optimum = datamodule.optimal_loss(split) if hasattr(datamodule, "optimal_loss") else None
        if optimum is not None:
            logs[f"{prefix}/optimal_loss"] = torch.tensor(optimum)
            logs[f"{prefix}/excess_loss"] = result["loss"] - optimum
        if prefix == "val":
            logs.update(
                {
                    "hp/val_loss": result["loss"],
                    "hp/val_ppl": result["ppl"],
                    "hp/val_bpb": bpb,
                    "hp/val_excess_loss": logs.get("val/excess_loss", torch.tensor(math.nan)),
                }
            )
        self.log_dict({k: v.float() for k, v in logs.items()})

    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None)

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        rank_zero_info(
            f"head {head_name(self.head)}: parameters (a shared tensor counted once) "
            + ", ".join(f"{k}={v:,}" for k, v in counts.items())
        )
        folder = self.logger.log_dir if self.logger is not None else None
        if folder and os.path.exists(os.path.join(folder, "hparams.yaml")):
            return  # resuming in the run's folder: its hyperparameters are logged already
        flat = self.flat_hparams()
        for logger in self.loggers:
            logger.log_hyperparams(flat, metrics=dict.fromkeys(HP_METRICS, math.nan))
            logger.log_metrics({f"params/{k}": float(v) for k, v in counts.items()}, step=0)

    def flat_hparams(self) -> dict[str, int | float | str]:
        """One flat dict with the same keys and types in every run (TensorBoard's HParams needs that)."""
        trainer = self.trainer
        datamodule = self._datamodule()
        data_hp = getattr(datamodule, "hparams", {})
        flat: dict[str, int | float | str] = {
            "head": head_name(self.head),
            "head_options": json.dumps(self.head.options(), sort_keys=True),
            "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
            "data": type(datamodule).__name__ if datamodule is not None else "none",
            "tokenizer": str(data_hp.get("tokenizer", "none")),
            "vocab_size": self.backbone.vocab_size,
            "batch_size": int(getattr(datamodule, "batch_size", 0)),
            "devices": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "tokens_per_step": int(getattr(datamodule, "batch_size", 0))
            * self.cfg.block_size
            * trainer.world_size
            * trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "max_steps": trainer.max_steps,
            "lr": self.hparams.lr,
            "weight_decay": self.hparams.weight_decay,
            "warmup_steps": self.hparams.warmup_steps,
            "loss_backend": self.resolve_loss_backend().name if self.head.is_linear else "naive",
        }
        for name, value in vars(self.cfg).items():
            flat[f"backbone/{name}"] = value if value is not None else self.cfg.embed_width
        flat.update({f"params/{k}": v for k, v in self.parameter_counts().items()})
        return flat

    def make_optimizer(self, fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on matrices and embeddings only; ``fused`` (default: on CUDA)
        runs the update as one kernel."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # unique tensors: a tied weight lands in exactly one group
            if p.requires_grad:
                (decay if unwrapped_name(name) in self._decay_names else no_decay).append(p)
        hp = self.hparams
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            fused=self.device.type == "cuda" if fused is None else fused,
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``--trainer.gradient_clip_val`` under every precision and strategy.

        Lightning's own clipping refuses two usual settings: mixed precision with a fused AdamW (which
        would unscale fp16 gradients inside ``step``) and clipping by norm under FSDP1. Here fp16
        gradients are unscaled first (``GradScaler.unscale_`` before a fused ``step`` is supported: the
        step then skips its own unscaling), FSDP1 clips through its root unit (the norm over every
        shard), and everything else through ``torch.nn.utils``, which handles FSDP2's sharded tensors.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # for other optimizers Lightning has unscaled before this hook
        params = [p for group in optimizer.param_groups for p in group["params"]]
        root = fsdp1_root(self)
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif root is not None:
            root.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.make_optimizer()
        schedule = partial(
            warmup_cosine,
            warmup=hp.warmup_steps,
            total=self.trainer.estimated_stepping_batches,
            min_ratio=hp.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[Callback]:
        """What every run of this module measures and how it stops; checkpointing, the progress bar and
        the learning-rate monitor are the trainer's (the CLI's defaults, or a user's own)."""
        return [TokenThroughput(), SampleWriter(), HeadDiagnostics(), TextSamples(), InterruptCheckpoint()]
