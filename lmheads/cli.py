"""``python -m lmheads``: LightningCLI with lmheads defaults, head short names and one-line errors."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lmheads.data import LMDataModule
from lmheads.errors import ConfigError, Interrupted, NonFiniteLossError
from lmheads.heads import broken_heads, registered_heads
from lmheads.heads.base import resolve_head
from lmheads.module import LMHeadModule, SamplingConfig
from lmheads.sharding import check_strategy

HEAD_KEY = "--model.head"

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "lmheads", "default_hp_metric": False},
    },
}


def expand_head_names(args: list[str]) -> list[str]:
    """Turn ``--model.head=untied`` (or ``--model.head untied``) into the head's class path.

    Class names of registered heads, YAML/JSON values and ``--model.head.*`` options pass through
    untouched; class paths are checked (importable, a Head, not abstract); an unknown bare name raises
    ``ConfigError`` listing the registered heads.
    """
    known_classes = {cls.__name__ for cls in registered_heads().values()}
    out = list(args)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key not in (HEAD_KEY, HEAD_KEY + ".help"):
            continue
        if eq:
            prefix, index = key + "=", i
        elif i + 1 < len(out):
            value, prefix, index = out[i + 1], "", i + 1
        else:
            continue
        if any(c in value for c in "{:/") or value in known_classes:
            continue
        cls = resolve_head(value)
        out[index] = prefix + f"{cls.__module__}.{cls.__qualname__}"
    return out


class LMHeadsCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model.head": {"class_path": "lmheads.heads.TiedHead"}})
        parser.link_arguments("model.backbone.block_size", "data.init_args.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_class_arguments(
            SamplingConfig, "sampling", help="Text generation for predict and for samples at validation."
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if args is None:
            args = sys.argv[1:]
        if isinstance(args, list):
            args = expand_head_names(args)
            self.config = parser.parse_args(args)
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self._checkpoint_state = (
            check_checkpoint(self.config[subcommand].get("ckpt_path")) if subcommand else None
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        check_strategy(self.trainer.strategy)  # before any process is launched
        state = getattr(self, "_checkpoint_state", None)
        if state is not None:  # here too for strategies that load the weights themselves (FSDP2)
            self.model.check_compatible(state)
            self._checkpoint_state = None
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        self.model.sampling = config.sampling

    def before_instantiate_classes(self) -> None:
        """Name each TensorBoard run after its head and seed so runs sit side by side; a fit resumed from
        a checkpoint inside a run folder continues in that folder."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        if not hasattr(logger, "init_args") or "TensorBoardLogger" not in str(logger.get("class_path")):
            return
        ckpt = config.get("ckpt_path")
        if (
            self.subcommand == "fit"
            and ckpt
            and Path(ckpt).is_file()
            and logger.init_args.get("version") is None
        ):
            run_dir = Path(ckpt).resolve().parent.parent
            name_dir = Path(logger.init_args.save_dir, logger.init_args.name or "").resolve()
            if run_dir.parent == name_dir:
                logger.init_args.version = run_dir.name
        if logger.init_args.get("version") is None:
            cls_path = str(config.model.head.class_path)
            head = next((n for n, c in registered_heads().items() if cls_path.endswith(c.__qualname__)), None)
            head = head or cls_path.rsplit(".", 1)[-1]
            seed = config.get("seed_everything")
            logger.init_args.version = f"{head}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_checkpoint(path: str | None) -> dict | None:
    """A one-line error for a checkpoint that is missing or unreadable, before Lightning opens it; its
    state dict (memory-mapped) to check against the model once that is built."""
    if path is None or path in ("last", "best", "hpc", "registry"):
        return None
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} does not exist; check --ckpt_path")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise ConfigError(
            f"checkpoint {path!r} cannot be read ({reason}); it is corrupt or not a checkpoint"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path!r} is not a Lightning checkpoint (no state_dict in it)")
    return checkpoint["state_dict"]


def list_heads(modules: list[str] = ()) -> str:
    """The ``heads`` command: every available head, its parameters and what it computes.

    ``modules`` are imported first, so heads defined in a user's own files are listed too."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"cannot import {module!r} ({err}); is its folder on PYTHONPATH?") from err
    heads = registered_heads()
    rows = [("name", "own parameters", "class", "description")]
    for name, cls in heads.items():
        rows.append((name, cls.formula or "?", f"{cls.__module__}.{cls.__qualname__}", cls.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    lines += [f"{name}  (failed to load: {why})" for name, why in broken_heads().items()]
    lines.append("\nV: vocabulary, D: model width, E: embedding width, r: rank, K: mixture components.")
    lines.append("Options of every head: logit_scale, softcap, z_loss, zero_init.")
    lines.append("`python -m lmheads fit --model.head.help NAME` explains a head's options.")
    return "\n".join(lines)


def main(args: list[str] | None = None, run: bool = True) -> LMHeadsCLI | None:
    """Entry point of ``python -m lmheads``; bad input ends with one ``error:`` line and exit status 2, a
    non-finite loss with status 3, Ctrl-C / SIGTERM (after saving a checkpoint) with 130 / 143.

    ``run=False`` parses and instantiates without a subcommand (the arguments then start with the
    options, e.g. ``["--config", "configs/quickstart.yaml"]``). ``heads [MODULE ...]`` lists the available
    heads, after importing the given modules.
    """
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["heads"]:  # python -m lmheads heads [MODULE ...]
            print(list_heads(argv[1:]))
            return None
        return LMHeadsCLI(
            LMHeadModule,
            LMDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": "Train and compare output heads of decoder-only language models. "
                "`python -m lmheads heads [MODULE ...]` lists the available heads."
            },
            args=args,
            run=run,
        )
    except Interrupted as err:
        if rank_zero_only.rank == 0:  # every process stops; one says so
            print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    except Exception as err:
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)


def _find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ``ConfigError`` behind ``err``; jsonargparse wraps errors raised while instantiating."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
