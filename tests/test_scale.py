"""Scaling out: DDP and gradient accumulation match a bigger batch, compile, FSDP wrapping, precision."""

from __future__ import annotations

import json
import math
import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lmheads.backbone import BackboneConfig, Block
from lmheads.data import SyntheticDataModule
from lmheads.errors import ConfigError
from lmheads.heads import head_class, registered_heads
from lmheads.module import LMHeadModule
from lmheads.reporting import parameter_counts
from lmheads.sharding import check_checkpoints, check_strategy

from .helpers import ROOT, fit, main, only_run, quick_args, run_lmheads, scalars
from .probes import FSDP1_BACKBONE, fsdp1_worker

BUILTIN = sorted(n for n, c in registered_heads().items() if c.__module__.startswith("lmheads."))
DUMP = ["--trainer.callbacks+=tests.probes.GradDump", "--trainer.limit_val_batches=0"]


def _grads(folder, world: int, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"grads-rank{rank}-of{world}.pt", weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


#: FSDP2 on 2 CPU processes (gloo), through the shipped config.
DP = "--trainer.strategy.init_args.data_parallel_size"
FSDP2 = ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator=cpu",
         "--trainer.devices=2", f"{DP}=2", "--trainer.precision=32-true"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    """Per-device batch b on 2 CPU processes, with DDP and with FSDP2, gives the gradients of batch 2b on
    one (the tied embedding included: reduced once, no unused parameters; FSDP2 keeps it in one unit)."""
    runs = {"single": (1, 16, []), "ddp": (2, 8, ["--trainer.strategy=ddp"]), "fsdp2": (2, 8, FSDP2)}
    for name, (world, batch, extra) in runs.items():
        out = tmp_path / name
        out.mkdir()
        args = ["fit", *quick_args(out, steps=1, every=1), *DUMP, f"--trainer.callbacks.folder={out}"]
        args += [f"--data.init_args.batch_size={batch}", f"--trainer.devices={world}", *extra]
        result = run_lmheads(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    single = _grads(tmp_path / "single", 1)
    assert single["backbone.wte.weight"].abs().sum() > 0
    for name in ("ddp", "fsdp2"):
        grads = _grads(tmp_path / name, 2)
        _assert_same(grads, _grads(tmp_path / name, 2, rank=1))  # reduced: identical on both ranks
        _assert_same(grads, single)


@pytest.mark.slow
@pytest.mark.slow
def test_fsdp2_evaluates_every_block_once_when_blocks_do_not_divide(tmp_path):
    """65 validation blocks on 2 FSDP2 processes: the one a block short runs a padding block (its
    forward gathers parameters like every other), so neither waits on the other, and the metrics equal
    one process's."""
    data = ["--data.init_args.batch_size=24", "--data.init_args.val_tokens=4160"]
    result = run_lmheads("fit", *quick_args(tmp_path, steps=2, every=2), *FSDP2, *data, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    cli = main([
        "validate", *quick_args(tmp_path), *data, "--trainer.logger=false",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ])  # fmt: skip
    logged = scalars(run)
    for tag in ("val/loss", "val/excess_loss", "val_freq/loss_top1pct"):
        assert math.isclose(cli.trainer.callback_metrics[tag].item(), logged[tag][-1][1], rel_tol=1e-5), tag


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "rank"), [("ddp", 1), ("fsdp2", None)])
def test_interrupt_and_resume_on_two_processes_reproduce_the_straight_run(tmp_path, strategy, rank):
    """A SIGTERM that reaches one process (ddp: rank 1 only) or all of them (fsdp2) stops both at the same
    step with one ordinary checkpoint; resuming from it ends bitwise where the uninterrupted run ends. The
    head copies the embedding into its own weight half way (under FSDP2 a copy between shards)."""
    parallel = FSDP2 if strategy == "fsdp2" else ["--trainer.devices=2", "--trainer.strategy=ddp"]
    common = [*parallel, "--model.head=untie_during_training", "--model.head.untie_at=0.5"]

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        out = tmp_path / name
        out.mkdir(exist_ok=True)
        return run_lmheads("fit", *quick_args(out, steps=4, every=2), *common, *extra, cwd=tmp_path)

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
        fit(out, *DUMP, f"--trainer.callbacks.folder={out}", *extra, steps=1, every=2)
    _assert_same(_grads(tmp_path / "acc", 1), _grads(tmp_path / "big", 1))


class _GradsAtBatchStart(L.Callback):
    """Records, at the start of each batch, how many parameters hold a gradient."""

    def __init__(self) -> None:
        self.held: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.held.append(sum(p.grad is not None for p in pl_module.parameters()))


def _three_quiet_steps(model_class=LMHeadModule, batch_size: int = 4, **trainer_options) -> LMHeadModule:
    """A 1-layer model of width 16 trained for three optimizer steps on the CPU from seed 0, nothing logged
    or saved."""
    L.seed_everything(0, verbose=False)
    data = SyntheticDataModule(
        vocab_size=64, train_tokens=4096, val_tokens=512, block_size=16, batch_size=batch_size
    )
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=16, block_size=16)
    model = model_class(backbone=cfg, vocab_size=data.vocab_size, warmup_steps=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, **trainer_options,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return model


def _accumulated_fit(batch_size: int, accumulate: int) -> tuple[torch.Tensor, list[int], int]:
    probe = _GradsAtBatchStart()
    model = _three_quiet_steps(batch_size=batch_size, accumulate_grad_batches=accumulate, callbacks=[probe])
    return model.backbone.wte.weight.detach().clone(), probe.held, len(list(model.parameters()))


def test_gradients_are_freed_after_each_optimizer_step_and_still_accumulate():
    """No step's forward runs beside the last step's gradients (they would add a float32 copy of the
    parameters to the peak); within an accumulation group they are kept and add up."""
    acc, held, n = _accumulated_fit(batch_size=4, accumulate=2)
    assert held == [0, n, 0, n, 0, n]  # freed at each group's start, all held in its middle
    big, held, _ = _accumulated_fit(batch_size=8, accumulate=1)
    assert held == [0, 0, 0]
    torch.testing.assert_close(acc, big, rtol=1e-5, atol=1e-6)  # three steps of the bigger batch


@pytest.mark.parametrize("backend", ["naive", "chunked"])
@pytest.mark.parametrize("name", BUILTIN)
def test_compile_every_head_without_graph_breaks(name, backend):
    torch.manual_seed(0)
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=16, block_size=8)
    options = {"backbone": cfg, "vocab_size": 40, "loss_backend": backend, "loss_chunk_size": 5}
    eager = LMHeadModule(head=head_class(name)(), **options)
    idx = torch.randint(0, 40, (2, 8))
    targets = torch.randint(0, 40, (2, 8))
    for path in (eager._train_loss, eager._token_loss):
        explanation = torch._dynamo.explain(path)(idx, targets)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.manual_seed(0)
    compiled = LMHeadModule(head=head_class(name)(), compile="aot_eager", **options)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. prefixes
    _same_loss_and_gradients(eager, compiled, idx, targets)
    with torch.no_grad():
        torch.testing.assert_close(eager.token_loss(idx, targets).nll, compiled.token_loss(idx, targets).nll)


def _same_loss_and_gradients(eager: LMHeadModule, other: LMHeadModule, idx, targets) -> None:
    """``other`` gives ``eager``'s training loss (with a gradient) and the same gradients."""
    a, b = eager.train_loss(idx, targets), other.train_loss(idx, targets)
    assert b.loss.requires_grad
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(eager.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "z_loss", "backend"),
    [("tied", 0.0, "naive"), ("tied", 1e-3, "naive"), ("mos", 0.0, "naive"), ("tied", 1e-3, "chunked"),
     ("tied_bias", 0.0, "chunked")],
)  # fmt: skip
def test_a_model_compiled_by_inductor_keeps_its_loss_and_gradients(name, z_loss, backend):
    """Inductor, the compiler model.compile=true uses (aot_eager above does not simplify): it folded the
    full-logits loss's `nll + 0` away, and the loss came out of the graph without a gradient. `mos` has
    no linear form: it always takes the full logits. The chunked loss's step writes each chunk's
    gradient over its logits inside the traced graph (chunks of 5 do not divide the 16 tokens)."""
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=16, block_size=8)
    options = {"backbone": cfg, "vocab_size": 40, "loss_backend": backend, "loss_chunk_size": 5}
    idx, targets = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    torch.manual_seed(0)
    eager = LMHeadModule(head=head_class(name)(z_loss=z_loss), **options)
    torch.manual_seed(0)
    compiled = LMHeadModule(head=head_class(name)(z_loss=z_loss), compile=True, **options)
    _same_loss_and_gradients(eager, compiled, idx, targets)


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_the_backbone_compiled_alone_keeps_the_loss_and_gradients(backend):
    """model.compile_loss=false: the backbone compiled, the loss eager after it (where the chunked loss
    keeps its memory saving): the same loss and gradients as the eager model."""
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=16, block_size=8)
    options = {"backbone": cfg, "vocab_size": 40, "loss_backend": backend, "loss_chunk_size": 5}
    idx, targets = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    torch.manual_seed(0)
    eager = LMHeadModule(head=head_class("tied")(z_loss=1e-3), **options)
    torch.manual_seed(0)
    split = LMHeadModule(
        head=head_class("tied")(z_loss=1e-3), compile="aot_eager", compile_loss=False, **options
    )
    assert split._compiled is None and split._hidden is not split._backbone_hidden
    _same_loss_and_gradients(eager, split, idx, targets)
    assert list(split.state_dict()) == list(eager.state_dict())  # parameters keep their names


def test_compile_option_through_the_cli(tmp_path):
    cli = fit(tmp_path, "--model.compile=aot_eager", "--trainer.logger=false", steps=2, every=2)
    assert cli.model._compiled is not None
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


class _FusedAdamW(LMHeadModule):
    """The module with the fused AdamW it uses on CUDA (fused AdamW runs on CPU too)."""

    fused = True

    def make_optimizer(self, fused=None):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


class _UnfusedAdamW(_FusedAdamW):
    fused = False


def _clipped_fit(fused: bool, precision, clip: float | None) -> torch.Tensor:
    plugin = {"plugins": [precision]} if not isinstance(precision, str) else {"precision": precision}
    model_class = _FusedAdamW if fused else _UnfusedAdamW
    model = _three_quiet_steps(model_class, gradient_clip_val=clip, **plugin)
    return model.backbone.wte.weight.detach().clone()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_with_a_fused_optimizer_under_mixed_precision(precision):
    """Lightning refuses to clip for an optimizer that unscales in its step; here it clips, and exactly as
    with the unfused optimizer. 16-mixed (fp16 autocast with a loss scale) is built by hand: Lightning turns
    the string into bf16-mixed on a CPU."""

    def plugin():
        if precision == "bf16-mixed":
            return precision
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))

    fused = _clipped_fit(True, plugin(), clip=0.01)
    unfused = _clipped_fit(False, plugin(), clip=0.01)
    unclipped = _clipped_fit(False, plugin(), clip=None)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)
    assert (unfused - unclipped).abs().max() > 1e-4  # the clip did act


@pytest.mark.slow
def test_fsdp1_groups_samples_and_diagnostics_see_whole_parameters(tmp_path):
    """FSDP1 with use_orig_params on two gloo processes: every parameter is a 1-D shard view, yet matrices
    still get weight decay, head diagnostics see the whole embedding, and sampling outside a step (through
    the root unit) continues a prompt as the unwrapped model does."""
    torch.multiprocessing.spawn(fsdp1_worker, args=(29641, str(tmp_path)), nprocs=2)
    model = LMHeadModule(backbone=FSDP1_BACKBONE, vocab_size=50)
    unwrapped = [len(g["params"]) for g in model.make_optimizer().param_groups]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"fsdp1-rank{rank}.pt", weights_only=True)
        assert result["groups"] == unwrapped and unwrapped[0] > 0
        assert result["embedding"] == (50, 16)
        assert result["same"]


def test_fsdp_policy_that_splits_the_tie_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    check_strategy(FSDPStrategy(auto_wrap_policy={Block}))
    check_strategy(FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy([Block])))
    for bad in ({Block, nn.Embedding}, ModuleWrapPolicy([Block, head_class("untied")])):
        with pytest.raises(ConfigError, match="must share one FSDP unit"):
            check_strategy(FSDPStrategy(auto_wrap_policy=bad))


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([f"{DP}=4"], "data_parallel_size=4, tensor_parallel_size=1 for 2 processes"),
        ([f"{DP}=1", "--trainer.strategy.init_args.tensor_parallel_size=2"],
         "data_parallel_size=1, tensor_parallel_size=2 for 2 processes"),
    ],
)  # fmt: skip
def test_fsdp2_sizes_that_leave_processes_out_are_refused_before_launch(tmp_path, capsys, sizes, message):
    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, *FSDP2, *sizes)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "set --trainer.strategy.init_args.data_parallel_size=2" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_checkpoints_written_as_folders_of_shards_are_refused_before_launch(tmp_path, capsys):
    """A folder of shards could not be continued, evaluated or exported ("does not exist"): a fit that
    would write them is refused, FSDP1's sharded state dicts too (its strategy needs CUDA to start)."""
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(SystemExit) as exc:
        fit(tmp_path, *FSDP2, f"{DP}=2", "--trainer.strategy.init_args.save_distributed_checkpoint=true")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "as folders of shards" in err
    assert "set --trainer.strategy.init_args.save_distributed_checkpoint=false" in err
    assert not (tmp_path / "quickstart").exists()
    with pytest.raises(ConfigError, match=r"set --trainer\.strategy\.init_args\.state_dict_type=full"):
        check_checkpoints(FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="sharded"))
    check_checkpoints(FSDPStrategy(auto_wrap_policy={Block}))


def test_fsdp2_checkpoint_of_another_vocabulary_is_refused_before_launch(tmp_path, capsys):
    fit(tmp_path / "small", "--data.init_args.vocab_size=512", steps=2, every=2)
    ckpt = only_run(tmp_path / "small") / "checkpoints" / "last.ckpt"
    options = [*FSDP2, "--trainer.devices=1", f"{DP}=1", f"--ckpt_path={ckpt}"]
    with pytest.raises(SystemExit) as exc:  # a resume: its data are not the checkpoint's
        fit(tmp_path / "big", *options, steps=4, every=2)
    assert exc.value.code == 2
    assert "data.vocab_size: 1024 here, 512 in the checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # an evaluation takes other data, not other weights
        main(["validate", *quick_args(tmp_path / "big"), *options])
    assert exc.value.code == 2
    assert "(512, 32) in the checkpoint, (1024, 32) here" in capsys.readouterr().err


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
@pytest.mark.parametrize(
    ("name", "backend"), [("tied", "chunked"), ("untie_during_training", "chunked"), ("tied", "naive")]
)
def test_a_gpu_training_step_never_waits_for_the_host(tmp_path, name, backend):
    """bf16-mixed, clipping, fused AdamW: between logging steps no training step synchronises with the
    host (the probe turns any synchronisation into an error at the line that made it)."""
    extra = ["--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0", f"--model.head={name}",
             f"--model.loss_backend={backend}", "--trainer.log_every_n_steps=4",
             "--trainer.callbacks+=tests.probes.NoHostSync"]  # fmt: skip
    try:
        cli = fit(tmp_path, *GPU, *extra, steps=8, every=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    probe = cli.trainer.callbacks[0]
    assert type(probe).__name__ == "NoHostSync"  # first: the other callbacks' batch starts are watched
    assert probe.watched == 5  # steps 2, 3, 5, 6 and 7 of 8
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml", "fsdp2.yaml"])
def test_fsdp_keeps_the_tie_on_gpu(tmp_path, config):
    sizes = [f"{DP}=1"] if config == "fsdp2.yaml" else []
    cli = fit(tmp_path, "--config", str(ROOT / "configs/trainer" / config), "--trainer.devices=1", *sizes,
              "--trainer.logger=false", "--model.head=tied", steps=4, every=2)  # fmt: skip
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    loaded = LMHeadModule.load_from_checkpoint(
        cli.trainer.checkpoint_callback.last_model_path, map_location="cpu"
    )
    form = loaded.head.linear_form(torch.zeros(1, loaded.cfg.d_model), loaded.backbone.wte)
    assert form.weight is loaded.backbone.wte.weight
    assert parameter_counts(loaded)["total"] == sum(p.numel() for p in loaded.parameters())
