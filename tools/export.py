"""Export a checkpoint's weights to safetensors (one owner per shared tensor) and check the round trip.

    python tools/export.py runs/quickstart/tied-seed0-.../checkpoints/last.ckpt model.safetensors

Load it back with ``lmheads.export.load_safetensors(path)``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lmheads.export import export_safetensors, load_safetensors
from lmheads.module import LMHeadModule
from lmheads.reporting import parameter_counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by lmheads")
    parser.add_argument("output", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    model = LMHeadModule.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    aliases = export_safetensors(model, args.output)
    again = load_safetensors(args.output).eval()
    idx = torch.randint(0, model.backbone.vocab_size, (2, min(16, model.cfg.block_size)))
    with torch.no_grad():
        same = torch.equal(model(idx), again(idx))
    counts = parameter_counts(model)
    head = model.head.spec()["class_path"]
    alias_note = f", aliases {aliases}" if aliases else ""
    print(f"wrote {args.output}: {counts['total']:,} unique parameters, head {head}{alias_note}; "
          f"reloaded logits identical: {same}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
