"""Fully sharded data parallel without breaking a tie.

A tied head reads the token embedding's weight, so the embedding, the final norm and the head must be
gathered together: both flavours of FSDP keep them in the root unit and give each transformer block a
unit of its own.

- Lightning's ``FSDPStrategy`` (FSDP1, CUDA only) wraps by policy: :func:`check_strategy` refuses a
  policy that would split the tie (``configs/trainer/fsdp.yaml`` ships one that does not).
- Lightning's ``ModelParallelStrategy`` (FSDP2, CUDA or CPU) leaves the sharding to the module:
  :func:`shard` is what ``LMHeadModule.configure_model`` applies (``configs/trainer/fsdp2.yaml``), over
  every process (:func:`check_strategy` refuses other mesh sizes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lmheads.backbone import Backbone
from lmheads.errors import ConfigError
from lmheads.heads import Head
from lmheads.lightning_internals import sharded_checkpoints

#: Methods of the module that run the model besides ``forward``; under FSDP2 they gather the parameters.
FORWARD_METHODS = ("train_loss", "token_loss", "generate")


def check_strategy(strategy, model: nn.Module | None = None) -> None:
    """Refuse, before training starts, an FSDP setting that would split the tie or that FSDP2 sharding
    cannot use, and FSDP for a ``model`` whose blocks are shared between layers (a unit applied several
    times in one forward, which lmheads does not shard); nothing for other strategies."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    backbone = getattr(model, "backbone", None)
    sharing = getattr(getattr(backbone, "cfg", None), "layer_sharing", "none")
    if sharing != "none" and isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        raise ConfigError(
            f"model.backbone.layer_sharing={sharing} applies a block at several layers, which lmheads does "
            f"not shard with FSDP ({type(strategy).__name__}); train it with DDP (configs/trainer/ddp.yaml) "
            "or set layer_sharing=none"
        )
    if isinstance(strategy, FSDPStrategy):
        check_fsdp_policy(strategy.kwargs.get("auto_wrap_policy"))
    elif isinstance(strategy, ModelParallelStrategy):
        world = strategy.num_nodes * len(strategy.parallel_devices or [None])
        data = getattr(strategy, "_data_parallel_size", world)
        tensor = getattr(strategy, "_tensor_parallel_size", 1)
        data = strategy.num_nodes if data == "auto" else data
        tensor = world // strategy.num_nodes if tensor == "auto" else tensor
        if tensor != 1 or data != world:
            raise ConfigError(
                f"ModelParallelStrategy with data_parallel_size={data}, tensor_parallel_size={tensor} for "
                f"{world} processes: lmheads shards with FSDP2 over every process; set "
                f"--trainer.strategy.init_args.data_parallel_size={world} and tensor_parallel_size=1 "
                "(configs/trainer/fsdp2.yaml)"
            )


def check_checkpoints(strategy) -> None:
    """Refuse, before a fit starts, a strategy that would write the run's checkpoints as folders of shards:
    lmheads reads a checkpoint file to continue, evaluate or export a run."""
    one_file = sharded_checkpoints(strategy)
    if one_file is not None:
        raise ConfigError(
            f"{type(strategy).__name__} would write the run's checkpoints as folders of shards, which "
            f"lmheads cannot continue, evaluate or export: set --trainer.strategy.init_args.{one_file} (one "
            "file, gathered on rank 0)"
        )


def check_fsdp_policy(policy) -> None:
    """Refuse an FSDP auto-wrap policy that would put the token embedding, final norm or head in a unit of
    their own: the tied head reads the embedding in the root unit, so all three must stay there."""
    classes = policy if isinstance(policy, set | list | tuple) else getattr(policy, "_module_classes", set())
    split = sorted(
        c.__name__ for c in classes if issubclass(c, nn.Embedding | nn.LayerNorm | Head | Backbone)
    )
    if split:
        raise ConfigError(
            f"the FSDP auto_wrap_policy wraps {', '.join(split)}: the token embedding, final norm and head "
            "must share one FSDP unit for a tie to stay a tie; wrap lmheads.backbone.Block only "
            "(configs/trainer/fsdp.yaml)"
        )


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 has sharded this module (its parameters are then DTensor shards between steps)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp1_root(module: nn.Module):
    """The FSDP1 unit that Lightning's ``FSDPStrategy`` wrapped around ``module``, or ``None``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = getattr(module, "_trainer", None)
    root = getattr(trainer.strategy, "model", None) if trainer is not None else None
    return root if isinstance(root, FullyShardedDataParallel) else None


def gathers_collectively(module: nn.Module) -> bool:
    """Whether running or reading the root unit outside a step needs every process (FSDP1 or FSDP2)."""
    return is_sharded(module) or fsdp1_root(module) is not None


def unwrapped_name(name: str) -> str:
    """A parameter's name as the unwrapped module calls it (FSDP1 and activation checkpointing insert
    the wrapped module's attribute into the names of the units they wrap)."""
    for segment in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(segment, "")
    return name


def shard(module: nn.Module, mesh) -> None:
    """FSDP2 over the data-parallel dimension of Lightning's device mesh: one unit per transformer block,
    and the root unit (``module`` itself: token embedding, final norm, head) gathered around ``forward``
    and :data:`FORWARD_METHODS`. The module needs ``backbone.blocks``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for block in module.backbone.blocks:
        fully_shard(block, mesh=data_parallel)
    fully_shard(module, mesh=data_parallel)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(module, name)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The root unit's full parameters (embedding, final norm, head) for code outside ``forward`` that
    reads them without running the model, such as head diagnostics. Every process must enter it (it
    all-gathers). A no-op for a module that is not sharded."""
    root = fsdp1_root(module)
    if root is not None:
        with type(root).summon_full_params(root, writeback=False, recurse=False):
            yield
    elif is_sharded(module):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield
