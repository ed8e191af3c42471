"""The LightningModule: a decoder backbone, a swappable head and one loss for every head."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import lightning as L
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lmheads.backbone import Backbone, BackboneConfig
from lmheads.checkpointing import (
    RNG_KEY,
    TOKEN_BUCKET_KEY,
    FiniteLoss,
    InterruptCheckpoint,
    check_compatible,
    restore_rng_state,
    rng_state,
)
from lmheads.diagnostics import GradientShare, HeadDiagnostics
from lmheads.errors import ConfigError, require
from lmheads.generation import SampleWriter, SamplingConfig, TextSamples, generate_tokens
from lmheads.heads import Head, TiedHead, head_from_spec, head_name
from lmheads.heads.base import resolve_head
from lmheads.lightning_internals import (
    resume_where_fit_ended,
    validate_and_stop_after_this_step,
)
from lmheads.loss import IGNORE_INDEX, BackendName, TokenLoss, TrainLoss, head_loss
from lmheads.metrics import SplitNLL, count_buckets, frequency_buckets
from lmheads.optim import OptimizerHooks, WarmupCosine, decay_names
from lmheads.perf import TokenThroughput
from lmheads.reporting import eval_metrics, log_run_start
from lmheads.settings import check_validations_end_steps
from lmheads.sharding import check_strategy, is_sharded, shard


class LMHeadModule(OptimizerHooks, L.LightningModule):
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
        lr_decay_steps: Steps the learning rate decays over, then ``min_lr_ratio * lr`` (default: the
            whole run). Fixed when a run starts; set it to train part of a longer schedule now.
        loss_backend: How the head's cross-entropy is computed: ``naive`` (full logits), ``chunked``
            (never holds the full logits), ``liger`` or ``cce`` (fused CUDA kernels, when installed), or
            ``auto`` (``chunked``). A head that is not a linear form always uses the full logits.
        loss_chunk_size: Tokens per chunk for ``chunked`` (default: a 256 MiB logit workspace).
        compile: Compile the backbone, head and loss with ``torch.compile`` (``true`` for the default
            backend, or a backend name such as ``aot_eager``). Parameters keep their names.
        compile_loss: With ``compile``, compile the head's loss into the graph too (default); ``false``
            compiles the backbone alone and runs the loss eagerly after it, where the chunked loss's
            memory saving survives Inductor.
        init_from: A local GPT-2 folder (HF ``save_pretrained``) whose weights a new fit starts from,
            with this module's head (:func:`lmheads.hf.init_from_gpt2`; ``data.tokenizer=pretrained``).

    The optimizer, its schedule and gradient clipping are :class:`lmheads.optim.OptimizerHooks`'.
    Generation settings for ``predict`` live in ``self.sampling`` (a :class:`SamplingConfig`), not in the
    checkpoint: the CLI sets them from ``--sampling.*``.
    """

    def __init__(
        self,
        head: Head | None = None,
        backbone: BackboneConfig = BackboneConfig(),
        vocab_size: int = 0,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: NonNegativeInt = 100,
        min_lr_ratio: ClosedUnitInterval = 0.1,
        lr_decay_steps: PositiveInt | None = None,
        loss_backend: BackendName = "auto",
        loss_chunk_size: PositiveInt | None = None,
        compile: bool | str = False,
        compile_loss: bool = True,
        init_from: str | None = None,
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
        if not all(0 <= beta < 1 for beta in betas):  # AdamW's own check is a traceback at the first step
            raise ConfigError(f"model.betas={tuple(betas)}: each must be in [0, 1)")
        if lr_decay_steps is not None and lr_decay_steps <= warmup_steps:
            raise ConfigError(
                f"model.lr_decay_steps={lr_decay_steps} leaves nothing to decay after "
                f"warmup_steps={warmup_steps}; set it above warmup_steps, or null for the whole run"
            )
        if isinstance(compile, str) and compile not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(
                f"model.compile={compile!r} is not a torch.compile backend: give true (Inductor), false, or "
                "a name that torch.compiler.list_backends(exclude_tags=()) lists, such as aot_eager"
            )
        if init_from:
            require("model.init_from (a GPT-2 to start from)", "hf", "transformers")
        head = TiedHead() if head is None else head
        if not isinstance(head, Head):
            raise ConfigError(f"model.head must be an lmheads.heads.Head, got {type(head).__name__}")
        self.cfg = backbone
        self.sampling = SamplingConfig()
        # Backbone first, then the head: for one seed the backbone starts identical whatever the head.
        self.backbone = Backbone(vocab_size, self.cfg)
        self.head = head
        self.head.build(vocab_size, self.cfg.d_model, self.cfg.embed_width)
        self.head.check_contract(self.backbone.wte)
        self.head_loss = head_loss(head, loss_backend, loss_chunk_size)  # chosen once, for this head
        # Decided before any wrapper reshapes the parameters.
        self._decay_names = decay_names(self)
        self.eval_nll = nn.ModuleDict({"val": SplitNLL(), "test": SplitNLL()})
        self.token_bucket: Tensor | None = None  # (V,) training-frequency bucket of each token id
        self.token_count_bucket: Tensor | None = None  # (V,) training-count bucket of each token id
        self.schedule: WarmupCosine | None = None  # with the optimizer; a resumed run's from its checkpoint
        # Compiling a bound method (not assigning a compiled module) keeps the state-dict keys unchanged.
        self._compiled, self._hidden = None, self._backbone_hidden
        backend = "inductor" if compile is True else compile
        if compile and compile_loss:
            self._compiled = {
                "train": torch.compile(self._train_loss, backend=backend),
                "eval": torch.compile(self._token_loss, backend=backend),
            }
        elif compile:  # the backbone alone; the loss after it, eagerly
            self._hidden = torch.compile(self._backbone_hidden, backend=backend)

    # ----------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy: FSDP2, with the embedding, final norm and head in the
        root unit so that a tie stays a tie (:func:`lmheads.sharding.shard`). Nothing otherwise."""
        if self.device_mesh is not None and not is_sharded(self):
            shard(self, self.device_mesh)

    def forward(self, idx: Tensor) -> Tensor:
        """Full logits (B, T, V) for token ids (B, T)."""
        return self.head.logits(self.backbone(idx), self.backbone.wte)

    def train_loss(self, idx: Tensor, targets: Tensor) -> TrainLoss:
        """Mean training loss (NLL plus the head's z-loss) of a batch, through the head's loss."""
        return (self._compiled["train"] if self._compiled else self._train_loss)(idx, targets)

    def token_loss(self, idx: Tensor, targets: Tensor) -> TokenLoss:
        """Per-token NLL and log-partition (B*T,). Without gradients, no backend but ``naive`` holds the
        full logits."""
        return (self._compiled["eval"] if self._compiled else self._token_loss)(idx, targets)

    def _backbone_hidden(self, idx: Tensor) -> Tensor:
        return self.backbone(idx).flatten(0, 1)  # (N, D)

    def _train_loss(self, idx: Tensor, targets: Tensor) -> TrainLoss:
        return self.head_loss.train_loss(self.head, self._hidden(idx), self.backbone.wte, targets.flatten())

    def _token_loss(self, idx: Tensor, targets: Tensor) -> TokenLoss:
        return self.head_loss.token_loss(self.head, self._hidden(idx), self.backbone.wte, targets.flatten())

    def token_nll(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Per-token NLL (B*T,); 0 where the target is ignored."""
        return self.token_loss(idx, targets).nll

    generate = generate_tokens  # extends prompts by sampled tokens (lmheads.generation)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        idx, targets = batch
        prompt = idx[:, : self.sampling.prompt_tokens]  # (B, P)
        out = self.generate(
            prompt, self.sampling.max_new_tokens, self.sampling.temperature, self.sampling.top_k
        )
        keep = (targets != IGNORE_INDEX).any(dim=1)  # (B,) a padding block (EvalShard) is not written
        return {"prompt": prompt[keep], "completion": out[keep, prompt.size(1) :]}

    # ------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy, self)
        if self.hparams.get("init_from") and stage == "fit" and self.trainer.ckpt_path is None:
            from lmheads.hf import init_from_gpt2

            rank_zero_info(init_from_gpt2(self, self.hparams.init_from))
        self.head_loss.check(self.trainer.strategy.root_device)
        datamodule = self.trainer.datamodule
        if datamodule is not None and "train" in getattr(datamodule, "splits", {}):
            counts = datamodule.train_token_counts()
            self.token_bucket, self.token_count_bucket = frequency_buckets(counts), count_buckets(counts)

    def on_fit_start(self) -> None:
        log_run_start(self, self.trainer)

    def on_train_start(self) -> None:
        check_validations_end_steps(self.trainer)
        self._step_before_batch, self._stop_at_step_end = self.trainer.global_step, False
        super().on_train_start()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_before_batch = self.trainer.global_step
        if self.head.on_train_step(self.global_step, self.schedule_steps(), self.backbone.wte):
            rank_zero_info(f"head {head_name(self.head)} changed its parameters at step {self.global_step}")
            self.forget_moments(self.head.parameters())  # they describe the old parameters

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        trainer = self.trainer
        if trainer.global_step == self._step_before_batch:
            # a batch that only accumulated gradients: a stop asked for here (max_time's) waits for the end
            # of the step, as a validation and a checkpoint here would hold half a step
            self._stop_at_step_end = self._stop_at_step_end or trainer.should_stop
            trainer.should_stop = False
            return
        # The last step is validated even where val_check_interval does not divide the run, so that the
        # run's metrics, results.json and best checkpoint are of the weights it ends with.
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        if (
            self._stop_at_step_end
            or 0 <= trainer.max_steps <= trainer.global_step
            or (last_epoch and batch_idx + 1 >= trainer.num_training_batches)
        ):
            validate_and_stop_after_this_step(trainer)

    def logging_step(self) -> bool:
        """Whether this training step is one Lightning writes (every ``log_every_n_steps``)."""
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return bool(every) and (self.global_step + 1) % every == 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        out = self.train_loss(*batch)
        if self.logging_step():  # self.log is not free
            self.log("train/loss", out.nll, prog_bar=True)
            if self.head.z_loss > 0:  # PaLM (Chowdhery et al. 2022, sec. 5): keeps log Z near 0
                self.log("train/z_loss", out.z_loss)
        return out.loss

    # ----------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        idx, targets = batch
        tables = None if self.token_bucket is None else (self.token_bucket, self.token_count_bucket)
        self.eval_nll[prefix].update(self.token_nll(idx, targets), targets.flatten(), tables)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", "validation")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", "test")

    def _log_eval(self, prefix: str, split: str) -> None:
        result, buckets, counts = self.eval_nll[prefix].compute(self.token_bucket is not None)
        self.log(f"{prefix}/loss", result["loss"].float(), prog_bar=True)
        self.log_dict(eval_metrics(prefix, split, result, buckets, self.trainer.datamodule, counts))

    # ------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_state()
        if self.token_bucket is not None:  # for tools that read a checkpoint without its data
            checkpoint[TOKEN_BUCKET_KEY] = self.token_bucket.to("cpu", torch.int8)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume_where_fit_ended(checkpoint)  # before Lightning restores its loops from it
        if "state_dict" in checkpoint:  # absent under FSDP2, whose strategy has already loaded the weights
            check_compatible(self, checkpoint["state_dict"])
        if RNG_KEY in checkpoint and self._trainer is not None:  # resuming: continue the streams exactly
            restore_rng_state(checkpoint[RNG_KEY])

    def configure_callbacks(self) -> list[Callback]:
        """What every run of this module measures and how it stops; checkpointing, the progress bar and
        the learning-rate monitor are the trainer's (the CLI's defaults, or a user's own)."""
        callbacks = [TokenThroughput(), SampleWriter(), HeadDiagnostics(), GradientShare(), TextSamples()]
        return [*callbacks, FiniteLoss(), InterruptCheckpoint()]


def module_from_checkpoint(path: str, checkpoint: dict) -> LMHeadModule:
    """The model of the lmheads checkpoint at ``path`` (``checkpoint``: that file as
    :func:`~lmheads.checkpointing.read_checkpoint` read it), on the CPU. One line (``ConfigError``) where
    the file is not lmheads' or its head's class cannot be imported here, before Lightning's loader,
    whose error is a page."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "head" not in hparams or "backbone" not in hparams:
        raise ConfigError(
            f"{path} is not an lmheads checkpoint (no head and backbone in its hyperparameters)"
        )
    if isinstance(hparams["head"], dict):
        resolve_head(str(hparams["head"]["class_path"]))
    return LMHeadModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
