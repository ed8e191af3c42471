"""Benchmark the head's loss: every available backend against the baseline users run, the compiled
full logits with ``F.cross_entropy`` on them in fp32 (nanoGPT's loss under autocast).

    python tools/bench_head.py --n 16384 --d 768 --v 50304 --dtype bfloat16          # on a GPU
    python tools/bench_head.py --n 2048 --d 256 --v 32768 --dtype float32 --iters 5  # CPU-sized

For hidden states h (N, D) and an output matrix W (V, D), both requiring gradients, each backend runs
forward+backward of the mean cross-entropy in one process, after warm-up. By default h and W are
tensors of ``--dtype``; with ``--mixed`` they are fp32 and every step runs under autocast to
``--dtype``, as in ``bf16-mixed`` training (fp32 weights and their fp32 gradient, products in bf16).
Per backend it prints the time per forward+backward, the peak memory on top of the inputs (gradients
included), the ratio of the time to that baseline (``F.cross_entropy fp32+compile``; its eager form
with ``--no-compile``; ``F.cross_entropy`` alone keeps bf16 or fp16 logits) and the ratio of the
memory to the gradient floor, (N*D + V*D) elements of the inputs' dtype, which any method must hold.
With ``--variants`` (CUDA) the chunked backend is also timed with each alternative to its chunk step's
defaults, so that the defaults rest on a measurement. On CUDA memory is the allocator's peak; on CPU
it is the process's peak resident memory (VmHWM, reset before each run).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmheads.heads import LinearForm
from lmheads.loss import BACKENDS, IGNORE_INDEX, ChunkGrad, LossBackend
from lmheads.perf import MiB, PeakMemory, count_arg, device_arg, synchronize


def mean_loss(backend: LossBackend) -> Callable[[LinearForm, torch.Tensor], torch.Tensor]:
    """The backend's training loss (no z-loss) as a function of the form and the targets."""
    return lambda form, targets: backend.train_loss(form, targets, IGNORE_INDEX, 0.0).loss


def users_loss(upcast: bool) -> Callable[[LinearForm, torch.Tensor], torch.Tensor]:
    """The loss users write: the full logits, then ``F.cross_entropy`` on them, in fp32 (nanoGPT's under
    autocast, where cross-entropy runs in fp32) or in the logits' own dtype."""

    def loss(form: LinearForm, targets: torch.Tensor) -> torch.Tensor:
        logits = form.hidden @ form.weight.T  # (N, V)
        return F.cross_entropy(logits.float() if upcast else logits, targets, ignore_index=IGNORE_INDEX)

    return loss


def variants(device: torch.device, mixed: bool) -> list[tuple[str, dict]]:
    """The chunk step's alternatives to its defaults (:class:`ChunkGrad`) that apply here: on CUDA the
    one-hot by scatter in the compiled softmax gradient (default: by comparison); under autocast, W's
    fp32 gradient summed by a product then an addition (default on CUDA: one GEMM with fp32 output)."""
    if device.type != "cuda":
        return []
    out = [("one-hot by scatter", {"onehot": "scatter"})]
    if mixed:
        out.append(("product, then sum", {"fp32_out_gemm": False}))
    return out


def run(
    fn: Callable, h, w, targets, warmup: int, iters: int, memory: PeakMemory, autocast: torch.dtype | None
) -> dict[str, float]:
    def step() -> torch.Tensor:
        h.grad = w.grad = None
        with torch.autocast(h.device.type, dtype=autocast, enabled=autocast is not None):
            loss = fn(LinearForm(h, w, None), targets)
        loss.backward()
        return loss.detach()

    for _ in range(warmup):
        loss = step()
    h.grad = w.grad = None
    memory.reset()
    loss = step()
    peak = memory.peak_mib()
    synchronize(h.device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(h.device)
    ms = (time.perf_counter() - start) / iters * 1e3
    return {"ms": ms, "mib": peak, "loss": loss.float().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=count_arg(), default=16384, help="tokens N")
    parser.add_argument("--d", type=count_arg(), default=768, help="hidden width D")
    parser.add_argument("--v", type=count_arg(), default=50304, help="vocabulary V")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--chunk-sizes",
        type=count_arg(),
        nargs="*",
        default=None,
        help="chunk sizes timed besides the default",
    )
    parser.add_argument("--warmup", type=count_arg(0), default=3)
    parser.add_argument("--iters", type=count_arg(), default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variants")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time the chunked step's alternatives to its defaults (CUDA), with the same chunk sizes",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="fp32 h and W under autocast to --dtype (bf16-mixed training) instead of --dtype tensors",
    )
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    autocast = dtype if args.mixed and dtype != torch.float32 else None
    stored = torch.float32 if args.mixed else dtype
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(args.n, args.d, device=device, generator=g) * 0.5).to(stored).requires_grad_()
    w = (torch.randn(args.v, args.d, device=device, generator=g) * 0.02).to(stored).requires_grad_()
    targets = torch.randint(0, args.v, (args.n,), device=device, generator=g)
    floor = (args.n * args.d + args.v * args.d) * h.element_size() / MiB

    naive = mean_loss(BACKENDS["naive"]())
    candidates: dict[str, Callable] = {}
    for label, upcast in (("F.cross_entropy fp32", True), ("F.cross_entropy", False)):  # the users' baselines
        if upcast or dtype != torch.float32:
            candidates[label] = users_loss(upcast)
            if not args.no_compile:
                candidates[f"{label}+compile"] = torch.compile(users_loss(upcast))
    candidates["naive"] = naive
    if not args.no_compile:
        candidates["naive+compile"] = torch.compile(naive)
    alternatives = variants(device, autocast is not None) if args.variants else []
    if args.variants and not alternatives:
        print("# variants: none here (the chunk step's alternatives are CUDA paths)")
    default = ChunkGrad().chunk_tokens(args.v, dtype, device, softcap=False)  # training's: always timed
    for c in sorted({default, *(args.chunk_sizes or [])}):
        size = f"C={c} (default)" if c == default else f"C={c}"
        chunked = mean_loss(BACKENDS["chunked"](c))
        candidates[f"chunked {size}"] = chunked
        if not args.no_compile:
            candidates[f"chunked {size}+compile"] = torch.compile(chunked)
        for label, options in alternatives:  # each against the row above, the step's defaults
            backend = BACKENDS["chunked"](c)
            backend.chunk_grad = ChunkGrad(**options)
            candidates[f"chunked {size} [{label}]"] = mean_loss(backend)
    for name in ("liger", "cce"):
        backend = BACKENDS[name]()
        package = backend.package[1]
        if device.type != "cuda" or importlib.util.find_spec(package) is None:
            print(f"# {name}: skipped ({package} not installed or not on CUDA)")
        elif name == "cce" and dtype == torch.float32:
            print("# cce: skipped (bf16 and fp16 only)")
        else:
            candidates[name] = mean_loss(backend)

    memory = PeakMemory(device)
    results = {}
    for name, fn in candidates.items():
        r = results[name] = run(fn, h, w, targets, args.warmup, args.iters, memory, autocast)
        print(f"# {name}: {r['ms']:.2f} ms, peak extra {r['mib']:,.0f} MiB", flush=True)  # if cut short
        # The candidates share code (the loss closure, the chunk step): without a reset their shapes and
        # options would add up to the recompile limit, past which a compiled candidate runs eager.
        torch.compiler.reset()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = f"fp32 under {args.dtype} autocast" if autocast is not None else args.dtype
    print(f"\nN={args.n} D={args.d} V={args.v} {precision} on {gpu}, torch {torch.__version__}; gradient "
          f"floor {floor:.0f} MiB; {args.iters} timed iterations after {args.warmup} warm-up")  # fmt: skip
    base_name = "F.cross_entropy fp32+compile" if not args.no_compile else "F.cross_entropy fp32"
    base = results[base_name]  # what users run: every ratio is against it
    print(f"\n| backend | ms fwd+bwd | x {base_name} | peak extra MiB | x floor | loss - naive |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [
            f"{r['ms']:.2f}",
            f"{r['ms'] / base['ms']:.2f}",
            f"{r['mib']:.0f}",
            f"{r['mib'] / floor:.2f}",
        ]
        print(f"| {name} | {' | '.join(cells)} | {r['loss'] - results['naive']['loss']:+.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
