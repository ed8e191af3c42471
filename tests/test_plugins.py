"""Heads from outside the package, options shared by all heads, the heads beyond the seed."""

from __future__ import annotations

import math
import runpy
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lmheads.backbone import Backbone, BackboneConfig
from lmheads.cli import main
from lmheads.errors import ConfigError
from lmheads.heads import (
    LinearForm,
    LinearHead,
    LowRankTiedHead,
    TiedBiasHead,
    TiedHead,
    UntiedHead,
    UntieDuringTrainingHead,
    base,
)
from lmheads.heads.base import resolve_head
from lmheads.heads.names import list_heads
from lmheads.module import LMHeadModule
from lmheads.reporting import parameter_counts

from . import external_heads  # noqa: F401  (registers a head from outside the package)
from .helpers import ROOT, fit, only_run, quick_args, scalars, tool

V, D = 61, 16
CFG = BackboneConfig(n_layer=1, n_head=2, d_model=D, block_size=8)


def module(head) -> LMHeadModule:
    torch.manual_seed(0)
    return LMHeadModule(head=head, backbone=CFG, vocab_size=V)


def tokens(B=2, T=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------- registration
@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed package exposing heads through the lmheads.heads entry-point group."""
    pkg = tmp_path / "extheads"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from lmheads.heads import LinearForm, LinearHead

            class DoubleTied(LinearHead):
                description = "tied, logits doubled"
                formula = "0"

                def project(self, h, embedding):
                    return LinearForm(2 * h, embedding.weight, None)
            """
        )
    )
    dist = tmp_path / "extheads-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: extheads\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lmheads.heads]\ndouble_tied = extheads:DoubleTied\nbroken = extheads.missing:Nope\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_BROKEN", {})
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    yield
    sys.modules.pop("extheads", None)


def test_entry_point_heads_get_short_names(fake_distribution, tmp_path):
    heads = base.registered_heads()
    assert heads["double_tied"].__name__ == "DoubleTied"
    listing = list_heads()
    assert "double_tied" in listing and "tied, logits doubled" in listing
    assert "broken  (failed to load: entry point 'broken'" in listing
    cli = fit(tmp_path, "--model.head=double_tied", steps=2, every=2)
    assert type(cli.model.head).__name__ == "DoubleTied"


def test_broken_entry_point_names_the_head_and_the_package(fake_distribution):
    with pytest.raises(ConfigError, match=r"head 'broken': entry point 'broken' = 'extheads.missing:Nope'"):
        base.head_class("broken")


def test_a_short_name_another_head_has_is_refused():
    """Two packages whose heads share a short name: the second is refused, not silently put in the first's
    place (``--model.head=NAME`` would train a head other than the one its author registered)."""

    def project(self, h, embedding):
        return base.LinearForm(h, embedding.weight, None)

    body = {"name": "twice_named", "project": project}
    first = type("Twice", (base.LinearHead,), {**body, "__module__": "first_package.heads"})
    try:
        taken = "head name 'twice_named' of second_package.heads.Twice is already taken by first_package"
        with pytest.raises(ConfigError, match=taken):
            type("Twice", (base.LinearHead,), {**body, "__module__": "second_package.heads"})
        assert base.registered_heads()["twice_named"] is first
        again = type("Twice", (base.LinearHead,), {**body, "__module__": "first_package.heads"})
        assert base.registered_heads()["twice_named"] is again  # the same module read again
    finally:
        base._REGISTRY.pop("twice_named", None)


def test_listing_shows_every_head_with_its_formula():
    listing = list_heads()
    for name, formula in [
        ("tied", "0"),
        ("untied", "V*D"),
        ("lowrank_tied", "r*(V+D)"),
        ("test_cosine_tied", "1"),
    ]:
        line = next(line for line in listing.splitlines() if line.startswith(name + " "))
        assert formula in line


def test_the_heads_command_has_help_and_lists_the_heads_of_modules_given(capsys):
    """``heads --help`` took ``--help`` for a module to import ("cannot import '--help'")."""
    with pytest.raises(SystemExit) as exit:
        main(["heads", "--help"])
    assert (
        exit.value.code == 0
        and "usage: python -m lmheads heads [-h] [modules ...]" in capsys.readouterr().out
    )
    main(["heads", "tests.external_heads", "json"])
    out = capsys.readouterr().out
    assert "test_cosine_tied" in out
    # a head without a name is not in the table; it and a module without heads are named after it
    assert (
        "\ntests.external_heads.SmallInitUntied  (no short name: give it by class path, "
        "--model.head=tests.external_heads.SmallInitUntied)\n" in out
    )
    assert "\njson: defines no head (a subclass of lmheads.heads.Head)\n" in out
    for path in ("my_heads.py", "./my_heads.py"):  # the file, not its module (./ ended in a traceback)
        with pytest.raises(SystemExit) as exit:
            main(["heads", path])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
        assert f"error: '{path}' is a file's path, not a module's name: give my_heads, run from" in err


def test_external_head_trains_from_yaml(tmp_path):
    config = tmp_path / "head.yaml"
    config.write_text(
        "model:\n  head:\n    class_path: tests.external_heads.CosineTiedHead\n"
        "    init_args:\n      tau: 5.0\n      softcap: 30.0\n"
    )
    cli = fit(tmp_path, "--config", str(config), steps=3, every=3)
    assert cli.model.head.options()["tau"] == 5.0 and cli.model.head.softcap == 30.0
    assert only_run(tmp_path).name.startswith("test_cosine_tied-seed0-")


def test_a_run_of_a_head_in_a_file_of_its_own_is_rebuilt_where_that_file_is(tmp_path, monkeypatch, capsys):
    """The commands and tools that rebuild a run's model say in one line that its head cannot be imported
    where the head's file is not on the import path, and write nothing (they printed a page of the
    parser's errors); the tools, as scripts, find it in the folder they start in, as fit does."""
    pytest.importorskip("transformers")
    from lmheads.hf import main as export

    (tmp_path / "own_heads.py").write_text(
        "from lmheads.heads import TiedHead\n\n\nclass OwnTied(TiedHead):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fit(tmp_path, "--model.head=own_heads.OwnTied", steps=2, every=2)
    run = only_run(tmp_path)
    ckpt, said = run / "checkpoints" / "last.ckpt", "head class 'own_heads.OwnTied' cannot be imported"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.delitem(sys.modules, "own_heads")
    with pytest.raises(ConfigError, match=said):
        export([str(run), str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match=f"^error: {said}"):
        tool("embeddings").main([str(run)])
    assert tool("export").main([str(ckpt), str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {said}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own_heads.py", "quickstart"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["export.py", str(ckpt), "m.safetensors"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "tools" / "export.py"), run_name="__main__")
    assert exit.value.code == 0 and "head own_heads.OwnTied" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.external_heads.Nope", "cannot be imported"),
        ("collections.OrderedDict", "is not a head"),
        ("lmheads.heads.Head", "does not implement the head contract: .* any other Head defines logits"),
        ("lmheads.heads.LinearHead", "does not implement the head contract: a LinearHead defines project"),
    ],
)
def test_bad_head_classes(path, message):
    with pytest.raises(ConfigError, match=message):
        resolve_head(path)


class _WrongVocabulary(LinearHead):
    def project(self, h, embedding):
        return LinearForm(h, embedding.weight[:-1], None)


class _WrongWidth(LinearHead):
    def project(self, h, embedding):
        return LinearForm(h[..., :-1], embedding.weight, None)


class _WrongBias(LinearHead):
    def project(self, h, embedding):
        return LinearForm(h, embedding.weight, embedding.weight.new_zeros(3))


class _WrongLogits(base.Head):
    def logits(self, h, embedding):
        return h @ embedding.weight[:5].T


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (_WrongVocabulary, rf"returns h' \(2, {D}\), W \({V - 1}, {D}\) and b None; they must be"),
        (_WrongWidth, rf"returns h' \(2, {D - 1}\), W \({V}, {D}\)"),
        (_WrongBias, r"and b \(3,\); they must be .* or None"),
        (_WrongLogits, rf"logits\(h\) for h of shape \(2, D\) is \(2, 5\), not \(2, V\) = \(2, {V}\)"),
    ],
)
def test_a_head_that_breaks_the_contract_is_refused_when_the_model_is_built(head, message):
    """A head of one's own is checked at the start, whether or not it is registered (the contract tests
    cover registered heads only): the shapes it returns, in one error."""
    with pytest.raises(ConfigError, match=rf"head '{head.__name__}' breaks the head contract: .*{message}"):
        module(head())


# ---------------------------------------------------------------- shared options
def test_logit_scale_multiplies_logits_and_bias():
    ref, scaled = module(TiedBiasHead()), module(TiedBiasHead(logit_scale=0.5))
    with torch.no_grad():
        ref.head.bias.normal_()
        scaled.head.bias.copy_(ref.head.bias)
    idx, _ = tokens()
    torch.testing.assert_close(scaled(idx), 0.5 * ref(idx))
    inv = module(TiedHead(logit_scale="inv_sqrt_d"))
    torch.testing.assert_close(inv(idx), module(TiedHead())(idx) / math.sqrt(D))


def test_softcap_bounds_logits_and_the_loss_uses_capped_logits():
    model = module(UntiedHead(softcap=0.5))
    with torch.no_grad():
        model.head.weight.mul_(100)
    idx, targets = tokens()
    logits = model(idx)
    assert logits.abs().max() <= 0.5
    raw = model.backbone(idx) @ model.head.weight.T
    torch.testing.assert_close(logits, 0.5 * torch.tanh(raw / 0.5))
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(model.token_nll(idx, targets), expected)


def test_z_loss_is_added_to_training_loss_only():
    model = module(TiedHead(z_loss=1e-2))
    idx, targets = tokens()
    logits = model(idx).flatten(0, 1)
    nll = F.cross_entropy(logits, targets.flatten())
    expected = nll + 1e-2 * logits.logsumexp(-1).square().mean()
    torch.testing.assert_close(model.training_step((idx, targets), 0), expected)


def test_zero_init_only_for_heads_with_an_output_matrix():
    assert not module(UntiedHead(zero_init=True)).head.weight.any()
    with pytest.raises(ConfigError, match=r"head 'tied': zero_init=True is invalid.*untied"):
        TiedHead(zero_init=True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TiedHead(softcap=-1.0), r"head 'tied': softcap=-1.0 is invalid; it must be positive"),
        (lambda: TiedHead(logit_scale=0.0), r"head 'tied': logit_scale=0.0"),
        (lambda: TiedHead(logit_scale="sqrt"), r"logit_scale='sqrt'"),
        (lambda: TiedHead(z_loss=-1e-4), r"z_loss=-0.0001"),
        (lambda: UntieDuringTrainingHead(untie_at=1.0), r"head 'untie_during_training': untie_at=1.0"),
        (lambda: LowRankTiedHead(rank=0), r"head 'lowrank_tied': rank=0"),
        (
            lambda: module(LowRankTiedHead(rank=D + 1)),
            rf"rank={D + 1} is invalid; it must be at most the width",
        ),
    ],
)
def test_invalid_options_name_head_and_option(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_invalid_option_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", *quick_args(tmp_path), "--model.head=lowrank_tied", "--model.head.rank=1000"])
    assert exc.value.code == 2
    assert (
        "head 'lowrank_tied': rank=1000 is invalid; it must be at most the width d_model=32"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------- heads beyond the seed
def test_lowrank_tied_starts_tied_and_adds_a_low_rank_delta():
    model = module(LowRankTiedHead(rank=3))
    idx, _ = tokens()
    torch.testing.assert_close(model(idx), module(TiedHead())(idx))  # B = 0: exactly tied
    with torch.no_grad():
        model.head.b.normal_()
    W = model.backbone.wte.weight + model.head.a @ model.head.b.T
    torch.testing.assert_close(model(idx), model.backbone(idx) @ W.T)
    assert parameter_counts(model)["head_own"] == 3 * (V + D)


def test_untie_during_training(tmp_path):
    cli = fit(tmp_path, "--model.head=untie_during_training", "--model.head.untie_at=0.5", steps=6, every=3)
    head, emb = cli.model.head, cli.model.backbone.wte.weight
    assert bool(head.untied)
    assert not torch.equal(head.weight, emb)  # copied at step 3, trained apart since
    assert (head.weight - emb).abs().max() < 0.1  # ...for three steps only
    state = cli.trainer.optimizers[0].state[head.weight]
    assert state["step"] == 3  # optimizer state restarted at the switch
    loaded = LMHeadModule.load_from_checkpoint(only_run(tmp_path) / "checkpoints" / "last.ckpt")
    assert bool(loaded.head.untied)  # a resumed run stays untied
    torch.testing.assert_close(loaded.head.weight, head.weight)


def test_untie_before_the_switch_is_exactly_tied():
    model = module(UntieDuringTrainingHead(untie_at=0.5))
    idx, _ = tokens()
    torch.testing.assert_close(model(idx), module(TiedHead())(idx))
    assert not model.head.on_train_step(4, 10, model.backbone.wte)
    assert model.head.on_train_step(5, 10, model.backbone.wte)
    assert torch.equal(model.head.weight, model.backbone.wte.weight)
    assert not model.head.on_train_step(6, 10, model.backbone.wte)  # only once
    with pytest.raises(ConfigError, match=r"set trainer\.max_steps"):
        model.head.on_train_step(6, -1, model.backbone.wte)


class _NoHostRead(torch.Tensor):
    """A tensor that fails when the host reads it as a bool (on a GPU, a wait for the device)."""

    def __bool__(self) -> bool:
        raise AssertionError("the switch was read on the host")


def test_untie_switch_is_never_read_from_the_device_in_a_step():
    model = module(UntieDuringTrainingHead(untie_at=0.5))
    model.head.untied = model.head.untied.as_subclass(_NoHostRead)
    switched = [model.head.on_train_step(step, 10, model.backbone.wte) for step in range(10)]
    assert switched == [False] * 5 + [True] + [False] * 4
    fresh = module(UntieDuringTrainingHead(untie_at=0.5))
    loaded = module(UntieDuringTrainingHead(untie_at=0.5))
    loaded.load_state_dict(model.state_dict())  # a checkpoint's switch is read once, at loading
    assert fresh.head.on_train_step(9, 10, fresh.backbone.wte)  # a tied head unties when due...
    assert not loaded.head.on_train_step(9, 10, loaded.backbone.wte)  # ...a resumed untied one not again


def test_scaled_input_embedding():
    """Gemma: token embeddings enter the residual stream multiplied by sqrt(d_model)."""
    seen = []
    for scale in (False, True):
        torch.manual_seed(0)
        model = Backbone(
            V, BackboneConfig(n_layer=1, n_head=2, d_model=D, block_size=8, scale_embedding=scale)
        )
        model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        idx, _ = tokens()
        model(idx)
        seen[-1] = seen[-1] - model.wpe.weight[:8]  # the token part of the block input
    torch.testing.assert_close(seen[1], seen[0] * math.sqrt(D))


# ---------------------------------------------------------------- diagnostics
@pytest.mark.parametrize(
    ("head", "expected", "absent"),
    [
        ("tied", {"diag/row_norm_mean"}, {"diag/cos_to_embedding_mean", "diag/bias_mean"}),
        ("untied", {"diag/cos_to_embedding_mean"}, {"diag/bias_mean"}),
        ("tied_bias", {"diag/bias_mean", "diag/bias_corr_log_freq"}, {"diag/cos_to_embedding_mean"}),
        ("lowrank_tied", {"diag/cos_to_embedding_mean"}, set()),
    ],
)
def test_diagnostics_in_tensorboard(head, expected, absent, tmp_path):
    fit(tmp_path, f"--model.head={head}", steps=3, every=3)
    logged = scalars(only_run(tmp_path))
    for bucket in ("top1pct", "1to10pct", "rest"):
        assert f"val_freq/loss_{bucket}" in logged and f"diag/row_norm_mean_{bucket}" in logged
    shares = sum(logged[f"val_freq/token_share_{b}"][-1][1] for b in ("top1pct", "1to10pct", "rest"))
    assert math.isclose(shares, 1.0, rel_tol=1e-5)
    assert expected <= set(logged) and not absent & set(logged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(only_run(tmp_path)))
    acc.Reload()
    assert "diag/row_norm" in acc.Tags()["histograms"]


def test_frequency_buckets_weigh_to_the_overall_loss(tmp_path):
    fit(tmp_path, steps=3, every=3)
    logged = scalars(only_run(tmp_path))
    overall = logged["val/loss"][-1][1]
    parts = sum(
        logged[f"val_freq/loss_{b}"][-1][1] * logged[f"val_freq/token_share_{b}"][-1][1]
        for b in ("top1pct", "1to10pct", "rest")
    )
    assert math.isclose(parts, overall, rel_tol=1e-4)
