from __future__ import annotations

import math

import pytest
import torch

from lmheads.backbone import Backbone, BackboneConfig
from lmheads.errors import ConfigError


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causal(positions):
    torch.manual_seed(0)
    model = Backbone(50, BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=12, positions=positions))
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the past does not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_rope_is_relative():
    """Rotary attention scores depend on the offset between positions, not on absolute position."""
    from lmheads.backbone import Rotary

    rot = Rotary(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    qs, ks = q.expand(1, 1, 32, 8), k.expand(1, 1, 32, 8)
    rq, rk = rot(qs), rot(ks)
    s1 = (rq[0, 0, 5] * rk[0, 0, 2]).sum()
    s2 = (rq[0, 0, 20] * rk[0, 0, 17]).sum()
    torch.testing.assert_close(s1, s2)


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = BackboneConfig(n_layer=8, n_head=4, d_model=256)
    model = Backbone(4096, cfg)
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    expected = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - expected) < 1e-3 * expected * 10
    assert not model.blocks[0].attn.qkv.bias.any()


def test_block_size_limit():
    model = Backbone(10, BackboneConfig(n_layer=1, n_head=1, d_model=8, block_size=4))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 130, "n_head": 4}, "not divisible by n_head"),
        ({"n_layer": 0}, "n_layer must be positive"),
        ({"block_size": -1}, "block_size must be positive"),
        ({"d_embed": 0}, "d_embed must be positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"d_model": 12, "n_head": 4, "positions": "rope"}, "even head width"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Backbone(10, BackboneConfig(**kwargs))


def test_bad_vocab():
    with pytest.raises(ConfigError, match="vocab_size must be positive"):
        Backbone(0, BackboneConfig())


@pytest.mark.parametrize(
    ("sharing", "k", "order"),
    [
        ("none", None, (0, 1, 2, 3, 4, 5)),
        ("all", None, (0, 0, 0, 0, 0, 0)),
        ("sequence", 3, (0, 0, 1, 1, 2, 2)),  # Takase & Kiyono 2021, fig. 1
        ("cycle", 3, (0, 1, 2, 0, 1, 2)),
        ("sequence", 4, (0, 0, 1, 2, 2, 3)),
        ("cycle", 4, (0, 1, 2, 3, 0, 1)),
    ],
)
def test_layer_sharing_assigns_blocks_to_layers(sharing, k, order):
    cfg = BackboneConfig(n_layer=6, n_head=2, d_model=16, layer_sharing=sharing, unique_layers=k)
    model = Backbone(10, cfg)
    assert cfg.layer_order == order
    assert len(model.blocks) == cfg.n_unique_layers == len(set(order))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    unshared = Backbone(10, BackboneConfig(n_layer=6, n_head=2, d_model=16))
    unique = sum(p.numel() for p in model.parameters())
    assert unique == sum(p.numel() for p in unshared.parameters()) - (6 - len(set(order))) * block
    assert model.repeated_parameters() == (6 - len(set(order))) * block


@pytest.mark.parametrize(("sharing", "k"), [("all", None), ("sequence", 2), ("cycle", 2)])
def test_a_shared_block_gets_the_sum_of_its_applications_gradients(sharing, k):
    """Against an unshared backbone whose blocks are copies of the shared ones, on the same batch: the
    same output, and each shared block's gradient is the sum of its copies' gradients."""
    torch.manual_seed(0)
    cfg = BackboneConfig(
        n_layer=4, n_head=2, d_model=16, block_size=8, layer_sharing=sharing, unique_layers=k
    )
    shared = Backbone(30, cfg)
    copies = Backbone(30, BackboneConfig(n_layer=4, n_head=2, d_model=16, block_size=8))
    state = {name: t for name, t in shared.state_dict().items() if not name.startswith("blocks.")}
    for position, i in enumerate(cfg.layer_order):  # each position gets a copy of the block it applies
        state.update({f"blocks.{position}.{name}": t for name, t in shared.blocks[i].state_dict().items()})
    copies.load_state_dict(state)
    idx = torch.randint(0, 30, (2, 8))
    out, reference = shared(idx), copies(idx)
    torch.testing.assert_close(out, reference)
    (out**2).sum().backward()
    (reference**2).sum().backward()
    for i, block in enumerate(shared.blocks):
        positions = [p for p, j in enumerate(cfg.layer_order) if j == i]
        for name, parameter in block.named_parameters():
            expected = sum(copies.blocks[p].get_parameter(name).grad for p in positions)
            torch.testing.assert_close(parameter.grad, expected, msg=f"blocks.{i}.{name}")
    torch.testing.assert_close(shared.wte.weight.grad, copies.wte.weight.grad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_sharing": "cycle"}, "layer_sharing=cycle needs unique_layers between 1 and n_layer - 1 = 3"),
        ({"layer_sharing": "sequence", "unique_layers": 4}, "needs unique_layers between 1 and"),
        (
            {"layer_sharing": "all", "unique_layers": 2},
            "unique_layers=2 is read by layer_sharing sequence or",
        ),
        ({"unique_layers": 2}, "this backbone's is none"),
    ],
)
def test_bad_layer_sharing(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Backbone(10, BackboneConfig(n_layer=4, **kwargs))
