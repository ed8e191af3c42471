"""Scaling out: DDP and gradient accumulation match a bigger batch, compile, FSDP wrapping, precision."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from torch import nn

from lmheads.backbone import BackboneConfig, Block
from lmheads.errors import ConfigError
from lmheads.heads import head_class, registered_heads
from lmheads.module import LMHeadModule, check_fsdp_policy

from .helpers import ROOT, fit, only_run, quick_args
from .test_cli import _run_module

BUILTIN = sorted(n for n, c in registered_heads().items() if c.__module__.startswith("lmheads."))
DUMP = ["--trainer.callbacks+=tests.probes.GradDump", "--trainer.limit_val_batches=0"]


def _grads(folder, world: int, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"grads-rank{rank}-of{world}.pt", weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    """Per-device batch b on 2 CPU processes gives the gradients of batch 2b on one (the tied embedding
    included: reduced once, no unused parameters)."""
    for world, batch in ((2, 8), (1, 16)):
        out = tmp_path / f"w{world}"
        out.mkdir()
        args = ["fit", *quick_args(out, steps=1, every=1), *DUMP, f"--trainer.callbacks.folder={out}"]
        args += [f"--data.init_args.batch_size={batch}", f"--trainer.devices={world}"]
        if world > 1:
            args.append("--trainer.strategy=ddp")
        result = _run_module(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    ddp = _grads(tmp_path / "w2", 2)
    _assert_same(ddp, _grads(tmp_path / "w2", 2, rank=1))  # all-reduced: identical on both ranks
    _assert_same(ddp, _grads(tmp_path / "w1", 1))
    assert ddp["backbone.wte.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "rank"), [("ddp", 1)])
def test_interrupt_and_resume_on_two_processes_reproduce_the_straight_run(tmp_path, strategy, rank):
    """A SIGTERM that reaches one process (ddp: rank 1 only) stops both at the same step with one
    checkpoint; resuming from it ends bitwise where the uninterrupted run ends. The head copies the
    embedding into its own weight half way."""
    parallel = ["--trainer.devices=2", f"--trainer.strategy={strategy}"]
    common = [*parallel, "--model.head=untie_during_training", "--model.head.untie_at=0.5"]

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        out = tmp_path / name
        out.mkdir(exist_ok=True)
        return _run_module("fit", *quick_args(out, steps=4, every=2), *common, *extra, cwd=tmp_path)

    assert run("straight").returncode == 0
    stop = run("resumed", "--trainer.callbacks+=tests.probes.SignalAt", "--trainer.callbacks.step=1",
               "--trainer.callbacks.signum=15", f"--trainer.callbacks.rank={json.dumps(rank)}")  # fmt: skip
    assert stop.returncode == 143, stop.stderr[-3000:]
    assert stop.stderr.count("interrupted: SIGTERM at step 1") == 1  # said once, by rank 0
    interrupted = only_run(tmp_path / "resumed") / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, map_location="cpu", weights_only=False)["global_step"] == 1
    again = run("resumed", f"--ckpt_path={interrupted}")
    assert again.returncode == 0, again.stderr[-3000:]
    last = {name: only_run(tmp_path / name) / "checkpoints" / "last.ckpt" for name in ("straight", "resumed")}
    straight, resumed = (
        torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in last.values()
    )
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    model = LMHeadModule.load_from_checkpoint(last["straight"], map_location="cpu")
    assert bool(model.head.untied) and not torch.equal(model.head.weight, model.backbone.wte.weight)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path):
    for name, extra in (("acc", ["--data.init_args.batch_size=8", "--trainer.accumulate_grad_batches=2"]),
                        ("big", ["--data.init_args.batch_size=16"])):  # fmt: skip
        out = tmp_path / name
        out.mkdir()
        fit(out, *DUMP, f"--trainer.callbacks.folder={out}", *extra, steps=1, every=1)
    _assert_same(_grads(tmp_path / "acc", 1), _grads(tmp_path / "big", 1))


@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("name", BUILTIN)
def test_compile_every_head_without_graph_breaks(name, backend):
    torch.manual_seed(0)
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=16, block_size=8)
    options = {"backbone": cfg, "vocab_size": 40, "loss_backend": backend, "loss_chunk_size": 5}
    eager = LMHeadModule(head=head_class(name)(), **options)
    idx = torch.randint(0, 40, (2, 8))
    targets = torch.randint(0, 40, (2, 8))
    eager.resolve_loss_backend()
    for path in (eager._train_loss, eager._token_loss):
        explanation = torch._dynamo.explain(path)(idx, targets)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.manual_seed(0)
    compiled = LMHeadModule(head=head_class(name)(), compile="aot_eager", **options)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. prefixes
    a, b = eager.train_loss(idx, targets), compiled.train_loss(idx, targets)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with torch.no_grad():
        torch.testing.assert_close(eager.token_loss(idx, targets).nll, compiled.token_loss(idx, targets).nll)


def test_compile_option_through_the_cli(tmp_path):
    cli = fit(tmp_path, "--model.compile=aot_eager", "--trainer.logger=false", steps=2, every=2)
    assert cli.model._compiled is not None
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def test_fsdp_policy_that_splits_the_tie_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    check_fsdp_policy(FSDPStrategy(auto_wrap_policy={Block}))
    check_fsdp_policy(FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy([Block])))
    for bad in ({Block, nn.Embedding}, ModuleWrapPolicy([Block, head_class("untied")])):
        with pytest.raises(ConfigError, match="must share one FSDP unit"):
            check_fsdp_policy(FSDPStrategy(auto_wrap_policy=bad))


# --------------------------------------------------------------------- GPU only (skipped without CUDA)
GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.logger=false"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_gpu(tmp_path, precision):
    cli = fit(tmp_path, *GPU, f"--trainer.precision={precision}", steps=4, every=2)
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tied", "untied", "untie_during_training"])
def test_inductor_compile_on_gpu(tmp_path, name):
    extra = ["--trainer.precision=bf16-mixed", "--model.compile=true", f"--model.head={name}"]
    cli = fit(tmp_path, *GPU, *extra, steps=4, every=2)
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


@pytest.mark.gpu
def test_fsdp_keeps_the_tie_on_gpu(tmp_path):
    cli = fit(tmp_path, "--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.devices=1",
              "--trainer.logger=false", "--model.head=tied", steps=4, every=2)  # fmt: skip
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    loaded = LMHeadModule.load_from_checkpoint(
        cli.trainer.checkpoint_callback.last_model_path, map_location="cpu"
    )
    form = loaded.head.linear_form(torch.zeros(1, loaded.cfg.d_model), loaded.backbone.wte)
    assert form.weight is loaded.backbone.wte.weight
    assert loaded.parameter_counts()["total"] == sum(p.numel() for p in loaded.parameters())
