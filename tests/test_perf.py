"""The benchmark tools and what they measure with (FLOPs per token, peak memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmheads.backbone import BackboneConfig
from lmheads.heads import head_class
from lmheads.loss.chunked import ChunkGrad
from lmheads.module import LMHeadModule
from lmheads.reporting import flops_per_token, parameter_counts

from .helpers import ROOT, tool

V, L_, D, T = 1000, 2, 64, 32


def module(name: str) -> LMHeadModule:
    cfg = BackboneConfig(n_layer=L_, n_head=4, d_model=D, block_size=T)
    return LMHeadModule(head=head_class(name)(), backbone=cfg, vocab_size=V)


def test_flops_count_each_matrix_product_once():
    block = 12 * D * D + 13 * D  # attention and MLP matrices with biases, two norms
    tied, untied = module("tied"), module("untied")
    non_embedding = parameter_counts(tied)["non_embedding"]
    assert abs(non_embedding - (L_ * block + 2 * D)) < 10 * D  # the layout is what the formula assumes
    attention = 12 * L_ * T * D
    assert flops_per_token(tied) == 6 * (non_embedding + V * D) + attention
    # Untied: its own W is the output product (counted once), the embedding is only a lookup.
    assert flops_per_token(untied) == flops_per_token(tied)
    assert flops_per_token(module("untie_during_training")) == flops_per_token(tied)
    assert flops_per_token(module("tied_bias")) == flops_per_token(tied) + 6 * V


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process: in the test process other tests' threads move the resident set too."""
    code = (
        "import torch\n"
        "from lmheads.perf import PeakMemory\n"
        "memory = PeakMemory(torch.device('cpu'))\n"
        "memory.reset()\n"
        "x = torch.ones(64 * 2**20 // 4)\n"  # 64 MiB, touched
        "del x\n"
        "print(memory.peak_mib() if memory.available else 64)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert 60 <= float(result.stdout) < 200, result.stdout


def test_bench_head_runs_every_backend(capsys):
    """On the default device of the machine: fp32 on a CPU, bf16 on a GPU (where cce needs it)."""
    bench = tool("bench_head")
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    bench.main(["--n", "96", "--d", "16", "--v", "300", "--dtype", dtype, "--iters", "1", "--warmup", "1",
                "--chunk-sizes", "32", "--no-compile"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| naive | " in out and "| chunked C=32 | " in out
    (users,) = [line for line in out.splitlines() if line.startswith("| F.cross_entropy fp32 |")]
    assert (
        users.split(" | ")[2] == "1.00" and "| x F.cross_entropy fp32 |" in out
    )  # the users' loss: the base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = ChunkGrad().chunk_tokens(300, getattr(torch, dtype), device, softcap=False)
    assert f"| chunked C={default} (default) | " in out  # what training uses, always timed
    assert "gradient floor" in out
    # as in bf16-mixed training: fp32 weights, bf16 products; the chunked loss matches the reference
    bench.main(["--n", "96", "--d", "16", "--v", "300", "--dtype", "bfloat16", "--mixed", "--iters", "1",
                "--warmup", "1", "--chunk-sizes", "32", "--no-compile"])  # fmt: skip
    out = capsys.readouterr().out
    assert "fp32 under bfloat16 autocast" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| chunked C=32 |")]
    assert abs(float(row.rstrip(" |").rsplit("| ", 1)[1])) < 1e-2  # loss - naive


def test_bench_head_times_the_chunk_steps_alternatives(capsys, monkeypatch):
    """--variants: the CUDA alternatives to the chunk step's defaults, each a row; none on a CPU."""
    bench = tool("bench_head")
    args = ["--n", "96", "--d", "16", "--v", "300", "--dtype", "bfloat16", "--mixed", "--iters", "1",
            "--warmup", "1", "--chunk-sizes", "32", "--no-compile", "--variants",
            "--device", "cpu"]  # fmt: skip
    bench.main(args)
    assert "# variants: none here" in capsys.readouterr().out
    on_cuda = bench.variants(torch.device("cuda"), mixed=True)
    assert [label for label, _ in on_cuda] == ["one-hot by scatter", "product, then sum"]
    assert [label for label, _ in bench.variants(torch.device("cuda"), mixed=False)] == ["one-hot by scatter"]
    monkeypatch.setattr(bench, "variants", lambda device, mixed: on_cuda)  # their options run on a CPU too
    bench.main(args)
    out = capsys.readouterr().out
    for label in ("one-hot by scatter", "product, then sum"):
        (row,) = [line for line in out.splitlines() if line.startswith(f"| chunked C=32 [{label}] |")]
        assert abs(float(row.rstrip(" |").rsplit("| ", 1)[1])) < 1e-2  # loss - naive


def test_bench_train_runs_every_path(capsys):
    """Every loss on both sides (the plain loop and Lightning), against the F.cross_entropy baseline,
    each path in two windows taken in turns."""
    bench = tool("bench_train")
    bench.main(["--preset", "tiny", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
                "--block-size", "16", "--batch", "2", "--vocab", "128", "--steps", "3", "--warmup", "1",
                "--no-compile", "--heads", "tied", "--chunk-sizes", "default", "8",
                "--repeats", "2"])  # fmt: skip
    out = capsys.readouterr().out
    chunk = ChunkGrad().chunk_tokens(128, torch.float32, torch.device("cpu"), softcap=False)
    default = f"chunked loss C={chunk} (default)"
    for row in (
        "| plain, F.cross_entropy | tied |",
        f"| plain, {default} | tied |",
        f"| lightning, {default} | tied |",
        "| lightning, chunked loss C=8 | tied |",
        "| plain, naive loss | tied |",
        "| lightning, naive loss | tied |",
        f"| framework: lightning / plain, {default} | tied |",
        "| framework: lightning / plain, naive loss | tied |",
        "| loss: chunked loss C=8 / F.cross_entropy, plain | tied |",
        "the median of 2 windows taken in turns",
        "MFU = tokens/s x FLOPs per token /",
        "loader alone:",
    ):
        assert row in out, row
    with pytest.raises(SystemExit):
        bench.main(["--chunk-sizes", "0"])
    assert "a chunk size is a positive integer or 'default', got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "args", "said"),
    [
        ("bench_head", ["--iters", "0"], "argument --iters: give a whole number of at least 1, got '0'"),
        # a chunk size of 0 was timed as the default and labelled C=0
        ("bench_head", ["--chunk-sizes", "0"], "argument --chunk-sizes: give a whole number of at least 1"),
        ("bench_head", ["--n", "0"], "argument --n: give a whole number of at least 1"),  # a table of nothing
        ("bench_head", ["--warmup", "-1"], "argument --warmup: give a whole number of at least 0"),
        ("bench_train", ["--steps", "0"], "argument --steps: give a whole number of at least 1"),
        ("bench_train", ["--repeats", "0"], "argument --repeats: give a whole number of at least 1"),
        ("bench_train", ["--heads", "bogus"], "error: unknown head 'bogus'; registered heads:"),
        ("bench_train", ["--device", "gpu0"], "argument --device: 'gpu0' is not a torch device"),
    ],
)
def test_the_benchmarks_refuse_what_would_time_nothing_or_mislabel_it(name, args, said, capsys):
    """Counts of 0 (a division by zero, or a table of nothing), a chunk size of 0, an unknown head and a
    device torch does not know are refused by the parser, before anything is timed."""
    small = {"bench_head": ["--n", "8", "--d", "8", "--v", "16"], "bench_train": ["--preset", "tiny"]}[name]
    with pytest.raises(SystemExit) as exc:  # small sizes first: were a value let through, it would be quick
        tool(name).main([*small, "--no-compile", "--warmup", "0", *args])
    assert exc.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_the_benchmarks_refuse_cuda_where_torch_has_none(capsys):
    for name in ("bench_head", "bench_train"):
        with pytest.raises(SystemExit):
            tool(name).main(["--device", "cuda"])
        assert (
            "argument --device: torch sees no CUDA device here; give --device cpu" in capsys.readouterr().err
        )
