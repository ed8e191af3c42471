"""Output heads. Importing this package registers the built-in heads by short name."""

from lmheads.heads.base import (
    Head,
    LinearForm,
    LinearHead,
    broken_heads,
    head_class,
    head_from_spec,
    head_name,
    registered_heads,
)
from lmheads.heads.lowrank import LowRankTiedHead, UntieDuringTrainingHead
from lmheads.heads.mixture import MixtureOfSoftmaxesHead
from lmheads.heads.projected import ProjectedTiedHead
from lmheads.heads.tied import TiedBiasHead, TiedHead
from lmheads.heads.untied import UntiedHead

__all__ = [
    "Head",
    "LinearForm",
    "LinearHead",
    "LowRankTiedHead",
    "MixtureOfSoftmaxesHead",
    "ProjectedTiedHead",
    "TiedBiasHead",
    "TiedHead",
    "UntieDuringTrainingHead",
    "UntiedHead",
    "broken_heads",
    "head_class",
    "head_from_spec",
    "head_name",
    "registered_heads",
]
