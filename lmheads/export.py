"""Export a trained model to safetensors and load it back, with one owner per shared tensor.

safetensors refuses tensors that share storage. lmheads heads read the embedding at call time, so a
state dict normally holds each tensor once; a head that does register a shared tensor is exported with
the first name as owner and the others recorded as aliases, which loading points at the owner.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lmheads.backbone import BackboneConfig
from lmheads.errors import ConfigError
from lmheads.heads import head_from_spec
from lmheads.module import LMHeadModule

METADATA_KEY = "lmheads"


def export_safetensors(model: LMHeadModule, path: str | Path) -> dict[str, str]:
    """Write weights and the configuration that rebuilds the model; returns alias -> owner names."""
    from safetensors.torch import save_file

    owners: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    config = {
        "vocab_size": model.backbone.vocab_size,
        "backbone": asdict(model.cfg),
        "head": model.head.spec(),
        "aliases": aliases,
    }
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(config)})
    return aliases


def load_safetensors(path: str | Path) -> LMHeadModule:
    """Rebuild the model from an exported file (ties are re-established by construction)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ConfigError(f"{path} was not written by lmheads (no {METADATA_KEY!r} metadata)")
    config = json.loads(metadata[METADATA_KEY])
    model = LMHeadModule(
        head=head_from_spec(config["head"]),
        backbone=BackboneConfig(**config["backbone"]),
        vocab_size=config["vocab_size"],
    )
    state = load_file(str(path))
    expected = model.state_dict().keys()
    for alias, owner in config["aliases"].items():
        if alias in expected:  # a head that registers the shared tensor again gets it back, tied
            state[alias] = state[owner]
    model.load_state_dict(state, strict=True)
    return model
