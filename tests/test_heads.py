"""The head contract, checked for every registered head (a new head is tested by defining it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmheads.backbone import BackboneConfig
from lmheads.errors import ConfigError
from lmheads.heads import LinearForm, LinearHead, TiedHead, UntiedHead, head_class, registered_heads
from lmheads.module import LMHeadModule
from lmheads.reporting import parameter_counts

from . import external_heads  # noqa: F401  (registers a head from outside the package)

V, D = 97, 32
HEADS = sorted(registered_heads())


def make(name: str, **cfg) -> LMHeadModule:
    torch.manual_seed(0)
    backbone = BackboneConfig(n_layer=2, n_head=4, d_model=D, block_size=16, **cfg)
    return LMHeadModule(head=head_class(name)(), backbone=backbone, vocab_size=V)


def batch(B: int = 3, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (B, T + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def test_builtin_and_external_heads_are_registered():
    builtin = {"tied", "untied", "tied_bias", "projected_tied", "lowrank_tied", "untie_during_training"}
    builtin |= {"mos"}
    assert builtin | {"test_cosine_tied"} <= set(HEADS)


@pytest.mark.parametrize("name", HEADS)
def test_shapes_and_finite_loss(name):
    model = make(name)
    idx, targets = batch()
    logits = model(idx)
    assert logits.shape == (3, 16, V)
    nll = model.token_nll(idx, targets)
    assert nll.shape == (3 * 16,)
    assert torch.isfinite(nll).all()
    if type(model.head).__module__.startswith("lmheads."):  # built-in heads start close to uniform
        assert abs(nll.mean().item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    # The loss path and the logits path agree.
    ref = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.filterwarnings("ignore:head 'mos' is not a linear form")
def test_float64_models_keep_float64_in_every_loss(name):
    """A model in float64 (``--trainer.precision=64-true``, the precision of numerical checks) has its
    loss, per-token NLL and gradients in float64 through every backend: equal to the float64 reference
    far below fp32's rounding (a loss upcast "to fp32" would round them there)."""
    torch.manual_seed(0)
    backbone = BackboneConfig(n_layer=1, n_head=4, d_model=D, block_size=16)
    idx, targets = batch()
    grads = {}
    for backend in ("naive", "chunked"):
        torch.manual_seed(0)
        model = LMHeadModule(head=head_class(name)(), backbone=backbone, vocab_size=V, loss_backend=backend)
        model.double()
        with torch.no_grad():
            for p in model.head.parameters():
                p.add_(0.01 * torch.randn_like(p))
        logits = model(idx).flatten(0, 1)
        reference = nn.functional.cross_entropy(logits, targets.flatten(), reduction="none")
        nll = model.token_nll(idx, targets)
        loss = model.train_loss(idx, targets).loss
        assert logits.dtype == nll.dtype == loss.dtype == torch.float64, backend
        torch.testing.assert_close(nll, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss, reference.mean(), rtol=1e-12, atol=1e-12)
        loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, grad in grads["naive"].items():
        assert grad.dtype == torch.float64, n
        torch.testing.assert_close(grads["chunked"][n], grad, rtol=1e-10, atol=1e-13, msg=n)


#: Own parameters of a freshly built head that do not yet affect the logits (zero gradient).
INACTIVE = {"untie_during_training": {"weight"}}  # its own matrix joins at the switch


@pytest.mark.parametrize("name", HEADS)
def test_gradients_reach_exactly_the_right_parameters(name):
    model = make(name)
    with torch.no_grad():  # move off zero initialisations (biases, LoRA-style factors) first
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    idx, targets = batch()
    model.token_nll(idx, targets).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} has no gradient (DDP would fail on it)"
        assert torch.isfinite(p.grad).all()
    emb = model.backbone.wte.weight
    assert all(p is not emb for p in model.head.parameters()), "a head must not register the embedding"
    inactive = INACTIVE.get(name, set())
    for pname, p in model.head.named_parameters():
        reached = p.grad.abs().sum() > 0
        assert reached != (pname in inactive), pname


@pytest.mark.parametrize("name", HEADS)
def test_embedding_gradient_from_both_uses_when_shared(name):
    """A tied embedding gets gradient from the input lookup *and* from the output projection."""
    model = make(name)
    idx, targets = batch()
    emb = model.backbone.wte.weight
    unused = torch.ones(V, dtype=torch.bool)
    unused[idx.unique()] = False  # rows never looked up as inputs
    assert unused.any()
    model.token_nll(idx, targets).mean().backward()
    output_grad_on_unused_rows = emb.grad[unused].abs().sum()
    if model.head.shares_embedding:
        assert output_grad_on_unused_rows > 0, "output use of E gave no gradient"
        # ...and the input use adds to the rows that were looked up: compare with the head path alone.
        emb.grad = None
        h = model.backbone(idx).detach().flatten(0, 1)
        nn.functional.cross_entropy(model.head.logits(h, model.backbone.wte), targets.flatten()).backward()
        head_only = emb.grad.clone()
        emb.grad = None
        model.token_nll(idx, targets).mean().backward()
        assert not torch.allclose(emb.grad[~unused], head_only[~unused])
    else:
        assert output_grad_on_unused_rows == 0, "an untied head must not reach the embedding"


@pytest.mark.parametrize("name", HEADS)
def test_parameter_counts_count_shared_tensor_once(name):
    model = make(name)
    counts = parameter_counts(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert counts["total"] == sum(unique.values())
    assert counts["token_embedding"] == V * D
    assert counts["head_own"] == sum(p.numel() for p in model.head.parameters())
    assert counts["head_shared"] == (V * D if model.head.shares_embedding else 0)
    assert counts["total"] == sum(p.numel() for p in model.backbone.parameters()) + counts["head_own"]


def test_tied_logits_are_h_times_embedding_transpose():
    model = make("tied")
    idx, _ = batch()
    h = model.backbone(idx)
    torch.testing.assert_close(model(idx), h @ model.backbone.wte.weight.T)
    form = model.head.project(h, model.backbone.wte)
    assert form.weight is model.backbone.wte.weight  # identity, not a copy
    assert form.bias is None


def test_tied_bias_starts_at_tied():
    tied, biased = make("tied"), make("tied_bias")
    idx, _ = batch()
    torch.testing.assert_close(tied(idx), biased(idx))
    assert biased.head.bias.shape == (V,) and not biased.head.bias.any()


def test_backbone_init_does_not_depend_on_head():
    a, b = make("tied"), make("untied")
    for (na, pa), (nb, pb) in zip(a.backbone.named_parameters(), b.backbone.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_untied_bias_option_and_counts():
    model = LMHeadModule(
        head=UntiedHead(bias=True), backbone=BackboneConfig(d_model=D, n_head=4), vocab_size=V
    )
    assert model.head.bias.shape == (V,)
    assert parameter_counts(model)["head_own"] == V * D + V
    assert model.head.options() == {
        "logit_scale": 1.0,
        "softcap": None,
        "z_loss": 0.0,
        "zero_init": False,
        "bias": True,
    }


def test_projected_tied_factorized_embedding():
    model = make("projected_tied", d_embed=8)
    assert model.backbone.wte.weight.shape == (V, 8)
    assert model.backbone.w_in.weight.shape == (D, 8)
    assert model.head.proj.shape == (8, D)
    idx, _ = batch()
    assert model(idx).shape == (3, 16, V)
    assert parameter_counts(model)["head_own"] == 8 * D


@pytest.mark.parametrize("name", ["tied", "tied_bias"])
def test_square_heads_reject_factorized_embedding(name):
    with pytest.raises(ConfigError, match="projected_tied"):
        make(name, d_embed=8)


def test_unknown_head_lists_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown head 'tide'; registered heads: .*tied.*untied"):
        head_class("tide")


def test_head_cannot_be_rebuilt_with_other_sizes():
    head = TiedHead()
    head.build(10, 8, 8)
    head.build(10, 8, 8)  # same sizes: a no-op
    with pytest.raises(ConfigError, match="cannot be reused"):
        head.build(11, 8, 8)


def test_a_user_head_registers_by_subclassing_and_trains():
    class HalfTied(LinearHead):
        name = "test_half_tied"
        description = "tied, hidden state halved"

        def project(self, h, embedding):
            return LinearForm(0.5 * h, embedding.weight, None)

    try:
        assert registered_heads()["test_half_tied"] is HalfTied
        model = LMHeadModule(head=HalfTied(), backbone=BackboneConfig(d_model=D, n_head=4), vocab_size=V)
        idx, _ = batch()
        torch.testing.assert_close(model(idx), 0.5 * model.backbone(idx) @ model.backbone.wte.weight.T)
        assert parameter_counts(model)["head_own"] == 0
    finally:
        from lmheads.heads import base

        base._REGISTRY.pop("test_half_tied")
