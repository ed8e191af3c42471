"""Training throughput: the real LightningModule and Trainer against a plain PyTorch loop, same model.

    python tools/bench_train.py                                  # GPT-2 small, V=50304, T=1024, B=16, bf16
    python tools/bench_train.py --preset tiny --steps 5 --warmup 2   # a CPU-sized check of the tool

For each head, in one process and on the same data, from the same weights:

- ``plain, F.cross_entropy``: a hand-written loop over the backbone and head with fused AdamW, autocast,
  ``torch.compile`` of the forward and the loss, and ``F.cross_entropy`` on the full logits (fp32
  upcast), as nanoGPT does: the baseline users run;
- ``plain, B loss`` for each ``--loss-backends`` B: the same loop computing lmheads' loss
  (``LMHeadModule.train_loss`` with ``model.loss_backend=B``, compiled as training compiles it);
- ``lightning, B loss``: ``LMHeadModule`` trained by a ``lightning.Trainer`` exactly as ``python -m lmheads
  fit`` does (its callbacks and logging; no validation, checkpoints or logger), with the same loss.

So ``lightning B / plain B`` is the framework's cost alone (the same loss on both sides) and ``plain B /
plain F.cross_entropy`` the loss's effect alone. The chunked loss runs once per ``--chunk-sizes`` C
(``default``: the workspace rule training uses). Each path runs ``--repeats`` times, the paths taking
turns (a fresh model each time), and its tokens/s is the median of its windows with their spread
(min-max); each window times ``--steps`` steps after ``--warmup`` (compilation), with one device
synchronisation at each end.

Printed per path and head: tokens/s, MFU, peak memory and, on CUDA, the memory allocated after the
forward, after the backward and after the optimizer step (gradients freed) of the first timed step.
MFU = tokens/s x FLOPs per token / matmul peak, with FLOPs per token =
:func:`lmheads.reporting.flops_per_token` (6 per weight of every matrix product, a shared block at
every layer, plus 12 L T D for attention) and the peak the dense bf16 (or fp32) matmul rate measured in
the same run; both are printed. The loader alone is timed too (batches to the device).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from contextlib import nullcontext

import lightning as L
import torch
import torch.nn.functional as F

from lmheads.backbone import BackboneConfig
from lmheads.data import SyntheticDataModule
from lmheads.errors import ConfigError
from lmheads.heads import head_class
from lmheads.loss.chunked import ChunkGrad
from lmheads.module import LMHeadModule
from lmheads.perf import PeakMemory, count_arg, device_arg, matmul_peak_tflops, synchronize
from lmheads.reporting import flops_per_token

PRESETS = {
    "gpt2": {"n_layer": 12, "n_head": 12, "d_model": 768, "block_size": 1024, "batch": 16, "vocab": 50304},
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 128, "block_size": 128, "batch": 8, "vocab": 4096},
}
PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": torch.float32}


class StepTimer(L.Callback):
    """Times optimizer steps ``warmup`` to the end, with one synchronisation at each end."""

    def __init__(self, warmup: int, memory: PeakMemory) -> None:
        self.warmup, self.memory = warmup, memory
        self.start = self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.start:
            self.memory.reset()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(trainer.strategy.root_device)
        self.seconds = time.perf_counter() - self.start


def allocated_mib(device: torch.device) -> float | None:
    """Memory the CUDA allocator holds now (``None`` elsewhere)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20


class MemoryPoints(L.Callback):
    """Memory allocated after the forward, the backward and the optimizer step of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.points = at, [None, None, None]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.at:
            self.points[0] = allocated_mib(trainer.strategy.root_device)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.at:
            self.points[1] = allocated_mib(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at + 1 and self.points[2] is None:  # the step has been taken
            self.points[2] = allocated_mib(trainer.strategy.root_device)


def make_data(args) -> SyntheticDataModule:
    tokens = (args.warmup + args.steps + 2) * args.batch * (args.block_size + 1)
    data = SyntheticDataModule(
        vocab_size=args.vocab,
        train_tokens=tokens,
        val_tokens=args.block_size + 1,
        block_size=args.block_size,
        batch_size=args.batch,
        num_workers=args.workers,
    )
    data.prepare_data()
    data.setup("fit")
    return data


def lightning_run(model: LMHeadModule, data, args, memory: PeakMemory, points: list) -> float:
    timer, at = StepTimer(args.warmup, memory), MemoryPoints(args.warmup)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        callbacks=[timer, at],
    )
    trainer.fit(model, datamodule=data)
    points[:] = at.points
    return timer.seconds


def plain_run(model: LMHeadModule, data, args, memory: PeakMemory, points: list, own_loss: bool) -> float:
    """The plain loop: ``F.cross_entropy`` on the full logits, or (``own_loss``) the module's loss."""
    device = torch.device(args.device)
    model = model.to(device)
    backbone, head = model.backbone, model.head
    optimizer = model.make_optimizer()  # the Lightning path's optimizer, without its schedule

    def loss_fn(idx, targets):
        logits = head.logits(backbone(idx), backbone.wte)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    if own_loss:  # compiled by the module as training compiles it

        def step_loss(idx, targets):
            return model.train_loss(idx, targets).loss

    else:
        step_loss = torch.compile(loss_fn) if args.compile else loss_fn
    dtype = PRECISION_DTYPE[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, step = 0.0, -1
    data.trainer = None  # a loader from the start of the data, not where an earlier fit stopped
    for step, (idx, targets) in enumerate(data.train_dataloader()):
        if step == args.warmup:
            memory.reset()
            start = time.perf_counter()
        if step == args.warmup + args.steps:
            break
        idx = idx.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast:
            loss = step_loss(idx, targets)
        first = step == args.warmup
        if first:
            points[0] = allocated_mib(device)
        scaler.scale(loss).backward()
        if first:
            points[1] = allocated_mib(device)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if first:
            points[2] = allocated_mib(device)
    if step < args.warmup + args.steps:
        raise RuntimeError(f"the loader ended after {step + 1} batches; the benchmark needs more data")
    synchronize(device)
    return time.perf_counter() - start


def loader_tokens_per_sec(data, args, batches: int) -> float:
    """Batches from the training loader to the device, nothing else."""
    device = torch.device(args.device)
    data.trainer = None
    it = iter(data.train_dataloader())
    next(it)  # workers started
    start = time.perf_counter()
    n = 0
    for idx, targets in it:
        idx.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        n += idx.numel()
        if n >= batches * args.batch * args.block_size:
            break
    synchronize(device)
    return n / (time.perf_counter() - start)


def chunk_size_arg(value: str) -> int | None:
    """A chunk size on the command line: a positive integer, or ``default`` (None)."""
    if value == "default":
        return None
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"a chunk size is a positive integer or 'default', got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="gpt2")
    parser.add_argument("--heads", nargs="+", default=["tied", "untied"])
    parser.add_argument("--steps", type=count_arg(), default=30, help="timed steps")
    parser.add_argument("--warmup", type=count_arg(0), default=10, help="untimed steps first (compilation)")
    parser.add_argument("--precision", default=None, choices=list(PRECISION_DTYPE))
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--loss-backends",
        nargs="+",
        default=["chunked", "naive"],
        choices=["naive", "chunked", "liger", "cce"],
        help="the Lightning path's model.loss_backend, one run each: with naive (full logits, as the plain "
        "loop) the ratio measures the framework alone, with the others the framework and the loss",
    )
    parser.add_argument(
        "--chunk-sizes",
        nargs="+",
        type=chunk_size_arg,
        default=[None],
        metavar="C",
        help="tokens per chunk of the chunked loss, one Lightning run each; 'default' is the size training "
        "uses when model.loss_chunk_size is null (default: default)",
    )
    parser.add_argument(
        "--workers", type=count_arg(0), default=None, help="loader workers (default: 4 on CUDA)"
    )
    parser.add_argument(
        "--repeats", type=count_arg(), default=3, help="timing windows per path, taken in turns"
    )
    for key in ("n_layer", "n_head", "d_model", "block_size", "batch", "vocab"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=count_arg(), default=None)
    args = parser.parse_args(argv)
    for name in args.heads:
        try:
            head_class(name)
        except ConfigError as err:  # before any path is timed
            parser.error(str(err))
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.workers = (4 if cuda else 0) if args.workers is None else args.workers
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    device = torch.device(args.device)
    dtype = PRECISION_DTYPE[args.precision]
    peak = matmul_peak_tflops(device, dtype)
    print(f"# matmul peak measured: {peak:.1f} TFLOP/s", flush=True)  # each line below stands alone
    data = make_data(args)
    cfg = BackboneConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        block_size=args.block_size,
        dropout=0.0,
    )
    memory = PeakMemory(device)
    tokens = args.steps * args.batch * args.block_size
    rows = []
    default_chunk = ChunkGrad().chunk_tokens(data.vocab_size, dtype, device, softcap=False)  # training's
    for name in args.heads:
        paths = [("plain, F.cross_entropy", "plain", "naive", None)]  # the baseline users run
        for backend in args.loss_backends:
            for chunk in args.chunk_sizes if backend == "chunked" else [None]:
                loss = f"{backend} loss"
                if backend == "chunked":
                    loss += f" C={chunk}" if chunk else f" C={default_chunk} (default)"
                paths += [
                    (f"plain, {loss}", "own", backend, chunk),
                    (f"lightning, {loss}", "lightning", backend, chunk),
                ]
        rates = {label: [] for label, *_ in paths}
        measured = {}
        for _ in range(args.repeats):  # the paths take turns: a slow moment of the machine hits all
            for label, kind, backend, chunk in paths:
                # Built just before its run and dropped after it: no earlier path's model or optimizer
                # is on the device while a path runs, so each peak is its own.
                L.seed_everything(0, verbose=False)  # the same initial weights for every path
                model = LMHeadModule(
                    head=head_class(name)(),
                    backbone=cfg,
                    vocab_size=data.vocab_size,
                    warmup_steps=0,
                    loss_backend=backend,
                    loss_chunk_size=chunk,
                    compile=args.compile and kind != "plain",  # the plain baseline compiles its own
                )
                flops = flops_per_token(model)
                points = [None, None, None]
                if kind == "lightning":
                    seconds = lightning_run(model, data, args, memory, points)
                else:
                    seconds = plain_run(model, data, args, memory, points, own_loss=kind == "own")
                rates[label].append(tokens / seconds)
                measured[label] = (flops, memory.peak_mib(True), points)
                del model
                torch.compiler.reset()  # compiled code holds no model; no path counts to the recompile limit
                gc.collect()  # the Trainer and its optimizer hold the model in reference cycles
                if cuda:
                    torch.cuda.empty_cache()
        for label, *_ in paths:
            flops, mib, points = measured[label]
            rate = statistics.median(rates[label])
            spread = (max(rates[label]) - min(rates[label])) / rate
            rows.append((label, name, rate, flops * rate / 1e12 / peak, mib, spread, points))
            print(f"# {label} {name}: {rate:,.0f} tokens/s (spread {100 * spread:.1f}%)", flush=True)
        median = {label: statistics.median(values) for label, values in rates.items()}
        for label, kind, *_ in paths:
            loss = label.split(", ", 1)[1]
            if kind == "lightning":  # the framework alone: the same loss on both sides
                ratio = median[label] / median[f"plain, {loss}"]
                rows.append((f"framework: lightning / plain, {loss}", name, ratio, None, None, None, None))
            elif kind == "own":  # the loss alone: the same loop on both sides
                ratio = median[label] / median["plain, F.cross_entropy"]
                rows.append((f"loss: {loss} / F.cross_entropy, plain", name, ratio, None, None, None, None))
    loader = loader_tokens_per_sec(data, args, batches=max(args.steps, 20))

    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"\n{args.preset}: L={args.n_layer} H={args.n_head} D={args.d_model} T={args.block_size} "
        f"B={args.batch} V={data.vocab_size}, {args.precision}, compile={args.compile}, on {where}, "
        f"torch {torch.__version__}; {args.steps} steps timed after {args.warmup}; "
        f"matmul peak measured {peak:.1f} TFLOP/s"
    )
    print(
        f"MFU = tokens/s x FLOPs per token / {peak:.1f} TFLOP/s (the dense matmul peak measured above); "
        f"FLOPs per token = 6 x matrix weights + 12 L T D = {rows[0][3] * peak * 1e12 / rows[0][2]:,.0f}"
        if rows and rows[0][3] is not None
        else ""
    )
    print(
        f"tokens/s: the median of {args.repeats} windows taken in turns, spread (max - min) / median; "
        "MiB after forward / backward / step (gradients freed): allocated at the first timed step (CUDA)"
    )
    print("\n| path | head | tokens/s | spread | MFU | peak MiB | MiB after fwd / bwd / step |")
    print("|---|---|---|---|---|---|---|")
    for path, name, value, mfu, mib, spread, points in rows:
        if mfu is None:
            print(f"| {path} | {name} | {value:.3f}x | | | | |")
        else:
            after = " / ".join(f"{p:,.0f}" if p is not None else "–" for p in points)
            cells = f"{value:,.0f} | {100 * spread:.1f}% | {100 * mfu:.1f}% | {mib:,.0f} | {after}"
            print(f"| {path} | {name} | {cells} |")
    fastest = max(r[2] for r in rows if r[3] is not None)
    print(f"\nloader alone: {loader:,.0f} tokens/s, {loader / fastest:.1f}x the fastest training step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
