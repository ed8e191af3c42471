"""Decoder-only pre-norm transformer. It owns the token embedding; heads read it at call time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmheads.errors import ConfigError


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the decoder backbone.

    Args:
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide ``d_model``.
        d_model: Residual-stream width D.
        d_embed: Token-embedding width E. ``None`` means E = D. With E != D the embedding is
            factorized (ALBERT, Lan et al. 2020): tokens are embedded at width E and projected to D.
        block_size: Context length T in tokens; the data module packs blocks of this length.
        dropout: Dropout on embeddings, attention weights and residual branches.
        positions: ``learned`` absolute position embeddings (GPT-2) or ``rope`` rotary
            embeddings in attention (Su et al. 2021).
        bias: Biases in linear layers and LayerNorms (GPT-2 uses them).
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        gelu: The MLP's GELU: ``exact`` (erf) or ``tanh``, the approximation GPT-2's weights were
            trained with (Hendrycks & Gimpel 2016; HF's ``gelu_new``).
        rope_base: Base of the rotary frequencies.
        scale_embedding: Multiply the input embeddings by sqrt(d_model), as Gemma does (Gemma Team
            2024): with a tied head the same matrix then serves inputs at O(1) scale and outputs at
            N(0, 0.02) scale.
        input_grad_scale: Multiplies the gradient that reaches the token embedding through the input
            lookup; the forward pass is unchanged. With a tied head, values below 1 weaken the input
            side's pull on the shared matrix (Lopardo et al. 2026); 0 leaves only the output side's.
        layer_sharing: How the ``n_layer`` block applications share parameters: ``none`` (each its own
            block), ``all`` (one block applied ``n_layer`` times: ALBERT's all-shared layers, Lan et al.
            2020; a Universal Transformer without adaptive halting, Dehghani et al. 2019), or
            ``sequence`` / ``cycle`` with ``unique_layers`` = k blocks (Takase & Kiyono 2021, sec. 2):
            ``sequence`` gives consecutive layers one block (0 0 1 1 2 2 for L=6, k=3), ``cycle``
            repeats the k blocks in order (0 1 2 0 1 2). Parameter counts count a shared block once;
            FLOPs count every application.
        unique_layers: k, the distinct blocks of ``sequence`` and ``cycle`` (1 <= k < n_layer).
    """

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_embed: int | None = None
    block_size: int = 128
    dropout: float = 0.0
    positions: Literal["learned", "rope"] = "learned"
    bias: bool = True
    mlp_ratio: int = 4
    gelu: Literal["exact", "tanh"] = "exact"
    rope_base: float = 10000.0
    scale_embedding: bool = False
    input_grad_scale: float = 1.0
    layer_sharing: Literal["none", "all", "sequence", "cycle"] = "none"
    unique_layers: int | None = None

    @property
    def embed_width(self) -> int:
        return self.d_model if self.d_embed is None else self.d_embed

    @property
    def layer_order(self) -> tuple[int, ...]:
        """The block each of the ``n_layer`` positions applies, in order (:attr:`layer_sharing`)."""
        L = self.n_layer
        if self.layer_sharing == "all":
            return (0,) * L
        if self.layer_sharing == "sequence":  # Takase & Kiyono 2021: ceil(L / k) consecutive layers a block
            return tuple(i * self.unique_layers // L for i in range(L))
        if self.layer_sharing == "cycle":
            return tuple(i % self.unique_layers for i in range(L))
        return tuple(range(L))

    @property
    def n_unique_layers(self) -> int:
        """The distinct blocks the backbone holds."""
        return len(set(self.layer_order))

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the option to change."""
        for name in ("n_layer", "n_head", "d_model", "block_size", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.backbone.{name} must be positive, got {getattr(self, name)}")
        if not self.input_grad_scale >= 0:
            raise ConfigError(f"model.backbone.input_grad_scale must be >= 0, got {self.input_grad_scale}")
        if self.d_embed is not None and self.d_embed <= 0:
            raise ConfigError(f"model.backbone.d_embed must be positive or null, got {self.d_embed}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.backbone.d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "choose an n_head that divides d_model"
            )
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"rotary positions need an even head width, got d_model/n_head={self.d_model // self.n_head}"
            )
        if not 0 < self.rope_base < math.inf:  # 0 made the rotary tables infinite, and the loss NaN
            raise ConfigError(f"model.backbone.rope_base must be positive and finite, got {self.rope_base}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.backbone.dropout must be in [0, 1), got {self.dropout}")
        k = self.unique_layers
        if self.layer_sharing in ("sequence", "cycle"):
            if k is None or not 1 <= k < self.n_layer:
                raise ConfigError(
                    f"model.backbone.layer_sharing={self.layer_sharing} needs unique_layers between 1 and "
                    f"n_layer - 1 = {self.n_layer - 1}, got {k}; set --model.backbone.unique_layers"
                )
        elif k is not None:
            raise ConfigError(
                f"model.backbone.unique_layers={k} is read by layer_sharing sequence or cycle only, and this "
                f"backbone's is {self.layer_sharing}: remove unique_layers, or set layer_sharing"
            )


class Rotary(nn.Module):
    """Rotary position embedding tables (Su et al. 2021), rotate-half convention."""

    def __init__(self, head_dim: int, block_size: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hd/2)
        # Buffers are derived, not learned: keep them out of the state dict.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.size(-2)
        cos = self.cos[:T].to(x.dtype)  # (T, hd/2)
        sin = self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.d_model // cfg.n_head
        self.rotary = Rotary(head_dim, cfg.block_size, cfg.rope_base) if cfg.positions == "rope" else None

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, D)
        return x + self.mlp(self.ln_2(x))


class Backbone(nn.Module):
    """Token embedding -> pre-norm blocks -> final LayerNorm; returns hidden states h of shape (B, T, D).

    The token embedding ``wte`` (V, E) lives here and nowhere else. Heads that tie to it receive it at
    call time, so no parameter is aliased at construction.
    """

    def __init__(self, vocab_size: int, cfg: BackboneConfig) -> None:
        super().__init__()
        cfg.validate()
        if vocab_size <= 0:
            raise ConfigError(f"vocab_size must be positive, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        E, D = cfg.embed_width, cfg.d_model
        self.wte = nn.Embedding(vocab_size, E)
        # Factorized embedding: E -> D on the input side (Lan et al. 2020, sec. 3.1).
        self.w_in = nn.Linear(E, D, bias=False) if E != D else None
        self.wpe = nn.Embedding(cfg.block_size, D) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_unique_layers))  # applied in layer_order
        self.ln_f = nn.LayerNorm(D, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation (Radford et al. 2019): N(0, 0.02) for weights and embeddings, zero
        biases, and residual output projections scaled by 1/sqrt(2 * n_layer). Every tensor is
        initialised exactly once."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        if self.cfg.block_size < T:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, E)
        if self.cfg.input_grad_scale != 1.0:
            x = ScaleGradient.apply(x, self.cfg.input_grad_scale)  # identity forward
        if self.w_in is not None:
            x = self.w_in(x)  # (B, T, D)
        if self.cfg.scale_embedding:
            x = x * math.sqrt(self.cfg.d_model)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))  # (B, T, D)
        x = self.drop(x)
        for i in self.cfg.layer_order:  # a shared block is applied at each of its positions
            x = self.blocks[i](x)  # (B, T, D)
        return self.ln_f(x)  # (B, T, D)

    def repeated_parameters(self) -> int:
        """Parameters applied again at positions of a block that comes earlier too: with
        :func:`lmheads.reporting.parameter_counts` (a shared tensor once) they make the parameters every
        token passes through, which FLOPs count."""
        sizes = [sum(p.numel() for p in block.parameters()) for block in self.blocks]
        return sum(sizes[i] for i in self.cfg.layer_order) - sum(sizes)
