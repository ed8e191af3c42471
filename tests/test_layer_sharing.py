"""Blocks shared between layers (``model.backbone.layer_sharing``) through the module, the CLI and the
strategies: counts, FLOPs, every head, compile, resume, DDP, and FSDP refused before it starts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lmheads.backbone import BackboneConfig, Block
from lmheads.errors import ConfigError
from lmheads.export import export_safetensors, load_safetensors
from lmheads.heads import registered_heads
from lmheads.module import LMHeadModule
from lmheads.reporting import flops_per_token, parameter_counts
from lmheads.sharding import check_strategy

from .helpers import fit, only_run, quick_args, run_lmheads, scalars
from .test_scale import DUMP, FSDP2, _assert_same, _grads

BUILTIN = sorted(n for n, c in registered_heads().items() if c.__module__.startswith("lmheads."))
CYCLE = [
    "--model.backbone.n_layer=4",
    "--model.backbone.layer_sharing=cycle",
    "--model.backbone.unique_layers=2",
]
SMALL = BackboneConfig(n_layer=4, n_head=2, d_model=16, block_size=8)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_head_on_a_shared_backbone_counts_blocks_once_and_flops_every_time(name):
    """Unique parameters count a shared block once (as they count the tie once); FLOPs per token count
    each of its applications, so they equal the unshared model's; the loss and its gradients run, also
    compiled (aot_eager) with the same values."""
    head = registered_heads()[name]
    shared_cfg = dataclasses.replace(SMALL, layer_sharing="all")
    torch.manual_seed(0)
    shared = LMHeadModule(head=head(), backbone=shared_cfg, vocab_size=40)
    unshared = LMHeadModule(head=head(), backbone=SMALL, vocab_size=40)
    block = sum(p.numel() for p in shared.backbone.blocks[0].parameters())
    counts, reference = parameter_counts(shared), parameter_counts(unshared)
    assert counts["total"] == reference["total"] - 3 * block
    assert counts["non_embedding"] == reference["non_embedding"] - 3 * block
    assert flops_per_token(shared) == flops_per_token(unshared)
    idx, targets = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    torch.manual_seed(0)
    compiled = LMHeadModule(head=head(), backbone=shared_cfg, vocab_size=40, compile="aot_eager")
    a, b = shared.train_loss(idx, targets), compiled.train_loss(idx, targets)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(shared.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert shared.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_hparams_row_counts_a_shared_block_once_and_an_export_keeps_the_sharing(tmp_path):
    cli = fit(tmp_path, *CYCLE, steps=2, every=2)
    logged, counts = scalars(only_run(tmp_path)), parameter_counts(cli.model)
    assert logged["params/total"] == [(0, counts["total"])]
    hparams = (only_run(tmp_path) / "hparams.yaml").read_text()
    assert "backbone/layer_sharing: cycle" in hparams and "backbone/unique_layers: 2" in hparams
    assert len(cli.model.backbone.blocks) == 2
    model, path = cli.model.eval(), tmp_path / "model.safetensors"
    export_safetensors(model, path)
    again = load_safetensors(path).eval()
    assert again.cfg.layer_order == (0, 1, 0, 1) and len(again.backbone.blocks) == 2
    idx = torch.randint(0, 1024, (2, 16))
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)


def test_a_shared_backbone_resumes_bitwise(tmp_path):
    dropout = "--model.backbone.dropout=0.1"
    straight = fit(tmp_path / "a", *CYCLE, dropout, steps=6, every=3).model
    fit(tmp_path / "b", *CYCLE, dropout, steps=3, every=3)
    last = only_run(tmp_path / "b") / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path / "b", *CYCLE, dropout, f"--ckpt_path={last}", steps=6, every=3).model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_a_shared_backbone_under_ddp_equals_one_process_with_double_batch(tmp_path):
    """DDP (gloo, two CPU processes) reduces a shared block's gradient, summed over its applications,
    like any other: per-device batch b on two processes gives the gradients of batch 2b on one."""
    for name, world, batch in (("single", 1, 16), ("ddp", 2, 8)):
        out = tmp_path / name
        out.mkdir()
        args = ["fit", *quick_args(out, steps=1, every=1), *CYCLE, *DUMP, f"--trainer.callbacks.folder={out}"]
        args += [f"--data.init_args.batch_size={batch}", f"--trainer.devices={world}"]
        args += ["--trainer.strategy=ddp"] * (world > 1)
        result = run_lmheads(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    single = _grads(tmp_path / "single", 1)
    assert single["backbone.blocks.1.attn.qkv.weight"].abs().sum() > 0
    assert "backbone.blocks.2.attn.qkv.weight" not in single  # two blocks for four layers
    _assert_same(_grads(tmp_path / "ddp", 2), single)
    _assert_same(_grads(tmp_path / "ddp", 2, rank=1), single)


def test_fsdp_with_shared_layers_is_refused_when_the_command_starts(tmp_path):
    """FSDP2 through the command (refused before any process is launched); FSDP1, which Lightning builds
    on a GPU only, by the check the command runs."""
    result = run_lmheads("fit", *quick_args(tmp_path), *CYCLE, *FSDP2, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error:") == 1
    assert "error: model.backbone.layer_sharing=cycle applies a block at several layers" in result.stderr
    assert not (tmp_path / "quickstart").exists()
    model = LMHeadModule(backbone=dataclasses.replace(SMALL, layer_sharing="all"), vocab_size=40)
    with pytest.raises(ConfigError, match="layer_sharing=all applies a block at several layers"):
        check_strategy(FSDPStrategy(auto_wrap_policy={Block}), model)
    check_strategy(FSDPStrategy(auto_wrap_policy={Block}), LMHeadModule(backbone=SMALL, vocab_size=40))
