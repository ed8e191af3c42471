"""Training callbacks that the module installs itself."""

from __future__ import annotations

import json
import resource
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lmheads.errors import Interrupted
from lmheads.metrics import FREQUENCY_BUCKETS
from lmheads.perf import synchronize
from lmheads.sharding import fsdp1_root, gathered, gathers_collectively


class TokenThroughput(Callback):
    """Logs ``perf/tokens_per_sec`` (all devices together) and ``perf/peak_mem_mib`` every
    ``log_every_n_steps`` optimizer steps.

    A window of steps is timed with one device synchronisation at its end, so the training step itself
    never waits for the host. Validation time is excluded: a window restarts after each validation.
    Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process's peak RSS on CPU.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._tokens = 0

    def _restart(self, trainer: L.Trainer) -> None:
        synchronize(trainer.strategy.root_device)
        self._t0 = time.perf_counter()
        self._tokens = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self._t0 is None:
            self._restart(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self._tokens += batch[0].numel()
        if trainer.global_step % trainer.log_every_n_steps or trainer.fit_loop._should_accumulate():
            return
        device = trainer.strategy.root_device
        synchronize(device)
        elapsed = time.perf_counter() - self._t0
        tokens_per_sec = self._tokens * trainer.world_size / max(elapsed, 1e-9)
        if device.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        pl_module.log_dict(
            {
                "perf/tokens_per_sec": tokens_per_sec,
                "perf/peak_mem_mib": float(peak_mib),
                "hp/tokens_per_sec": tokens_per_sec,
            },
            on_step=True,
            on_epoch=False,
            sync_dist=False,
            rank_zero_only=True,
        )
        self._restart(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None


class SampleWriter(BasePredictionWriter):
    """Writes ``predict`` output, decoded by the data module, to ``samples-rank<r>.jsonl`` in the run's
    log directory (or the trainer's root directory), and prints the first few samples."""

    def __init__(self, show: int = 3) -> None:
        super().__init__(write_interval="batch")
        self.show = show
        self._shown = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        decode = getattr(trainer.datamodule, "decode", None) or (lambda ids: " ".join(map(str, ids)))
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"samples-rank{trainer.global_rank}.jsonl"
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


class HeadDiagnostics(Callback):
    """After each validation, describes the head's effective output matrix W and bias b.

    For every head: norms of the output rows (mean, std, and mean per training-frequency bucket). For
    heads whose W is not the embedding E itself: the cosine similarity of each W row to the same
    token's E row. For heads with a bias: its mean, spread, range and correlation with the log of the
    training frequency (a bias that learns the unigram distribution correlates strongly). Scalars go to
    ``diag/...``; with TensorBoard, the per-token distributions also go to its histograms.
    """

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not pl_module.head.is_linear:  # no single output matrix to describe
            return
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
        bucket = getattr(pl_module, "_token_bucket", None)
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


class TextSamples(Callback):
    """After each validation, continues the first ``sampling.validation_samples`` validation prompts and
    writes prompt and continuation to TensorBoard's text tab (``samples/<i>``).

    Sampling uses its own seeded generator: the samples of one step are comparable across heads and
    the training random state is left untouched (so resumed runs stay exact).
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = pl_module.sampling
        datamodule = trainer.datamodule
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if (
            trainer.sanity_checking
            or not (trainer.is_global_zero or gathers_collectively(pl_module))  # sharded: all generate
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
        for i in range(n):
            prompt = datamodule.decode(out[i, : prompts.size(1)].tolist())
            completion = datamodule.decode(out[i, prompts.size(1) :].tolist())
            text = f"**prompt** {_markdown_code(prompt)}\n\n**continuation** {_markdown_code(completion)}"
            for logger in loggers:
                logger.experiment.add_text(f"samples/{i}", text, trainer.global_step)


def _markdown_code(text: str) -> str:
    """Text as a markdown code block, so whitespace and markup characters show as they are."""
    return "\n\n    " + text.replace("\n", "\n    ")


class InterruptCheckpoint(Callback):
    """Ctrl-C or SIGTERM during ``fit``: finish the current step, save ``interrupted.ckpt`` beside the
    other checkpoints, and stop with exit status 130 (SIGINT) or 143 (SIGTERM).

    A signal only marks the process; after each training step the processes agree (a maximum over a
    small gloo all-reduce, which never waits for the GPU) and all stop at that same step, whichever of
    them received it: one rank (``kill`` of one process), all of them (Ctrl-C in a terminal, SLURM,
    torchrun), or several at slightly different times. A second Ctrl-C interrupts at once. The
    checkpoint is taken between steps, so resuming from it continues exactly where training stopped.
    """

    def __init__(self) -> None:
        self._previous_handlers: dict[int, object] = {}
        self._group = None
        self.signal: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here rather than in on_fit_start: Lightning installs its own SIGTERM handler in between.
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank creates it, in the same order

        def on_signal(signum, frame) -> None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (again to abort at once)" if signum == signal.SIGINT else ""
            rank_zero_info(f"\n{name}: stopping after this step and saving a checkpoint{again}")
            self.signal = self.signal or signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        received = self.signal or 0
        if self._group is not None:
            flag = torch.tensor([received], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag)
        if received:
            self.signal = self.signal or received
            trainer._signal_connector.received_sigterm = True  # Lightning raises after this step

    def _restore_handler(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
        self._previous_handlers = {}
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        folder = (
            Path(checkpoint.dirpath)
            if checkpoint is not None and checkpoint.dirpath
            else Path(trainer.default_root_dir)
        )
        path = folder / "interrupted.ckpt"
        trainer.save_checkpoint(path)
        name, code = ("SIGINT", 130) if self.signal == signal.SIGINT else ("SIGTERM", 143)
        raise Interrupted(
            f"{name} at step {trainer.global_step}: saved {path}; resume with --ckpt_path={path}", code
        ) from exception
