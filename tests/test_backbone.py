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
