"""Export a checkpoint's weights to safetensors (one owner per shared tensor) and check the round trip.

    python tools/export.py runs/quickstart/tied-seed0-... model.safetensors   # or one of its checkpoints

Load it back with ``lmheads.export.load_safetensors(path)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lmheads.checkpointing import read_checkpoint
from lmheads.errors import ConfigError, failed_write, mend
from lmheads.export import export_safetensors, load_safetensors
from lmheads.files import remove
from lmheads.module import module_from_checkpoint
from lmheads.reporting import parameter_counts
from lmheads.run.layout import checkpoint_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a run folder (its checkpoints/last.ckpt) or a checkpoint of lmheads"
    )
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; give another output path, or --overwrite", file=sys.stderr)
        return 2
    if not args.output.parent.is_dir():
        print(f"error: {args.output.parent} is not a folder; create it, or give another output path",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        path = str(checkpoint_file(args.checkpoint))
        checkpoint = read_checkpoint(path, given_as="the checkpoint's path")
        model = module_from_checkpoint(path, checkpoint).eval()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # written beside the output and moved there once the round trip holds: a failed export changes nothing
    partial = args.output.with_name(f".{args.output.name}.partial")
    try:
        aliases = export_safetensors(model, partial)
        again = load_safetensors(partial).eval()
        idx = torch.randint(0, model.backbone.vocab_size, (2, min(16, model.cfg.block_size)))
        with torch.no_grad():
            same = torch.equal(model(idx), again(idx))
        if not same:
            print(f"error: the model reloaded from {args.output} gives other logits; nothing written",
                  file=sys.stderr)  # fmt: skip
            return 1
        partial.replace(args.output)
    except Exception as err:
        if (full := failed_write(err)) is None:
            raise
        print(f"error: {args.output} could not be written ({full.strerror}); {mend(full)}, or give "
              "another output path; nothing was written", file=sys.stderr)  # fmt: skip
        return 2
    finally:
        remove(partial)
    counts = parameter_counts(model)
    head = model.head.spec()["class_path"]
    alias_note = f", aliases {aliases}" if aliases else ""
    print(f"wrote {args.output}: {counts['total']:,} unique parameters, head {head}{alias_note}; "
          "reloaded logits identical")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(1, os.getcwd())  # where `python -m lmheads` finds a head of your own
    sys.exit(main())
