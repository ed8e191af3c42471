"""Heads between tied and untied."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmheads.errors import ConfigError
from lmheads.heads.base import LinearForm, LinearHead
from lmheads.heads.tied import check_square


class LowRankTiedHead(LinearHead):
    """logits = h (E + A B^T)^T: the embedding plus a learned rank-r correction.

    r = 0 would be ``tied`` and r = D is as expressive as ``untied``, so the rank spans the continuum
    between the two at V*r + D*r extra parameters. A starts N(0, 0.02) and B at zero, so training starts
    exactly tied; as in LoRA (Hu et al. 2021), B receives gradient from the first step and A once B is
    nonzero.

    Args:
        rank: Rank r of the correction, 1 <= r <= D.
        **kwargs: Options shared by all heads (see :class:`~lmheads.heads.Head`).
    """

    name = "lowrank_tied"
    description = "embedding plus a learned rank-r correction: logits = h (E + A B^T)^T"
    formula = "r*(V+D)"

    def __init__(self, rank: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        if rank < 1:
            self._bad_option("rank", rank, ">= 1")
        self.rank = rank

    def _create_parameters(self) -> None:
        check_square(self)
        if self.rank > self.d_model:
            self._bad_option("rank", self.rank, f"at most the width d_model={self.d_model}")
        self.a = nn.Parameter(torch.empty(self.vocab_size, self.rank))  # (V, r)
        self.b = nn.Parameter(torch.zeros(self.d_model, self.rank))  # (D, r)
        nn.init.normal_(self.a, std=0.02)

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        weight = torch.addmm(embedding.weight, self.a, self.b.T)  # (V, D) = E + A B^T
        return LinearForm(h, weight, None)


class UntieDuringTrainingHead(LinearHead):
    """Starts tied; at a fraction of training it takes its own copy of E and the two train apart.

    modded-nanogpt's speedrun record untied the head at 2/3 of training. The own matrix W (V, D) exists
    from the start (so the optimizer and distributed wrappers see it); before the switch it enters the
    logits through a select that gives it zero gradient, W's optimizer state is reset at the switch, and
    the switch is a buffer in the checkpoint, so a resumed run stays untied.

    Args:
        untie_at: Fraction of the training steps (those the learning rate decays over) after which the
            head unties, in (0, 1).
        **kwargs: Options shared by all heads (see :class:`~lmheads.heads.Head`).
    """

    name = "untie_during_training"
    description = "tied until a fraction of training, then untied: logits = h E^T, then h W^T from W = E"
    formula = "V*D"

    def __init__(self, untie_at: float = 2 / 3, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < untie_at < 1.0:
            self._bad_option("untie_at", untie_at, "a fraction in (0, 1)")
        self.untie_at = untie_at

    def _create_parameters(self) -> None:
        check_square(self)
        self.weight = nn.Parameter(torch.zeros(self.vocab_size, self.d_model))  # (V, D), set at the switch
        self.register_buffer("untied", torch.zeros((), dtype=torch.bool))
        # A host copy of the switch: reading the buffer on a GPU every step would wait for the device.
        self._untied_host = False
        self.register_load_state_dict_post_hook(self._read_switch)

    @staticmethod
    def _read_switch(module: UntieDuringTrainingHead, incompatible_keys) -> None:
        module._untied_host = bool(module.untied)  # once per checkpoint load

    def on_train_step(self, step: int, total_steps: int, embedding: nn.Embedding) -> bool:
        if total_steps < 0:
            raise ConfigError(
                f"head {self.name!r}: untie_at={self.untie_at} is a fraction of training, which has no set "
                "length; set trainer.max_steps or trainer.max_epochs"
            )
        if self._untied_host or step < self.untie_at * total_steps:
            return False
        with torch.no_grad():
            self.weight.copy_(embedding.weight)
            self.untied.fill_(True)
        self._untied_host = True
        return True

    def project(self, h: Tensor, embedding: nn.Embedding) -> LinearForm:
        # A select, not a Python branch, so torch.compile traces one graph for both phases; W stays in the
        # graph (zero gradient while tied), so DDP needs no unused-parameter search.
        weight = torch.where(self.untied, self.weight, embedding.weight)  # (V, D)
        return LinearForm(h, weight, None)
