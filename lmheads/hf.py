"""Models that leave lmheads: a checkpoint as an HF transformers GPT-2 (``GPT2LMHeadModel``), which
``AutoModelForCausalLM.from_pretrained`` loads without lmheads, with its tokenizer as ``tokenizer.json``.

The export is exact or refused. lmheads' backbone with learned positions is GPT-2's computation:
pre-norm blocks of LayerNorm (eps 1e-5), fused q/k/v attention scaled by 1/sqrt(head width), a GELU MLP
of ``mlp_ratio`` x D and a final LayerNorm, with exact GELU (``activation_function="gelu"``, not GPT-2's
tanh approximation). A backbone without biases exports with zero biases, the same computation. The
output layer:

- the tied head (W = E, no bias, no scale) stays tied: ``tie_word_embeddings``, one tensor in the file;
- any other linear head whose logits are ``h @ W_eff.T`` for one matrix (``untied``; ``projected_tied``,
  ``lowrank_tied``, ``untie_during_training``; a ``logit_scale``) folds into an untied ``lm_head``, and
  the export says so.

What GPT-2 does not compute (rotary positions, a factorised or scaled input embedding, blocks shared
between layers, an output bias, a soft-cap, a mixture of softmaxes) is exported with a modeling file of
its own (:mod:`lmheads.hf_remote`, ``trust_remote_code=True``), and the export says why.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from lmheads.data.tokenizers import PretrainedTokenizer, Tokenizer
from lmheads.errors import ConfigError, failed_write, make_folder, mend, require
from lmheads.heads import LinearForm, LinearHead, head_name
from lmheads.hf_tokenizer import hf_tokenizer
from lmheads.run.layout import run_of_checkpoint

#: GPT-2's block modules and lmheads' (its Linear layers are Conv1D: weights transposed).
_NORMS = {"ln_1": "ln_1", "ln_2": "ln_2"}
_LINEARS = {
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}


def unsupported(model) -> list[str]:
    """What in ``model`` (an :class:`~lmheads.module.LMHeadModule`) GPT-2 does not compute ([] if
    nothing)."""
    cfg, head = model.cfg, model.head
    reasons = []
    if cfg.positions != "learned":
        reasons.append(f"positions={cfg.positions} (GPT-2 has learned positions)")
    if cfg.embed_width != cfg.d_model:
        reasons.append(f"a factorised embedding (d_embed={cfg.d_embed} < d_model={cfg.d_model})")
    if cfg.scale_embedding:
        reasons.append("scale_embedding (GPT-2 does not scale its input embeddings)")
    if cfg.layer_sharing != "none":
        reasons.append(f"layer_sharing={cfg.layer_sharing} (GPT-2 has a block for every layer)")
    if not isinstance(head, LinearHead):
        reasons.append(f"head {head_name(head)!r} is not a linear form")
        return reasons
    if head.softcap is not None:
        reasons.append(f"head softcap={head.softcap} (GPT-2's logits are not capped)")
    with torch.no_grad():
        if head.project(model.backbone.ln_f.weight[None], model.backbone.wte).bias is not None:
            reasons.append(f"head {head_name(head)!r} has an output bias (GPT-2's lm_head has none)")
    return reasons


@torch.no_grad()
def linear_map(form_of, d_model: int, embedding: nn.Embedding, name: str) -> LinearForm:
    """A head's form (``form_of``: its ``project`` or ``linear_form``) as matrices: h' = h P, with P (D, K)
    the form's ``hidden`` at h = I, its W (V, K) and b. Raises ``ConfigError`` where h' is not a linear
    map of h (head ``name``), so that no matrix computes it."""
    eye = torch.eye(d_model, dtype=embedding.weight.dtype, device=embedding.weight.device)  # (D, D)
    form = form_of(eye, embedding)
    probe = torch.randn(3, d_model, dtype=eye.dtype, generator=torch.Generator().manual_seed(0)).to(
        eye.device
    )
    if not torch.allclose(form_of(probe, embedding).hidden, probe @ form.hidden, atol=1e-6):
        raise ConfigError(
            f"head {name!r}: its h' is not a linear map of h, so no matrix of the export computes it; "
            "evaluate the checkpoint with lmheads (validate, test, predict)"
        )
    return form


def is_identity(matrix: Tensor) -> bool:
    """Whether a form's P is the identity (h' = h), in the matrix's own dtype and device."""
    n = matrix.shape[0]
    return matrix.shape == (n, n) and torch.equal(
        matrix, torch.eye(n, dtype=matrix.dtype, device=matrix.device)
    )


@torch.no_grad()
def output_matrix(model) -> Tensor | None:
    """The one matrix W_eff (V, D) with logits = h @ W_eff.T, or ``None`` where the head is the tie itself
    (W = E, h' = h). Raises ``ConfigError`` for an output bias or a head whose h' is not linear in h."""
    head, embedding = model.head, model.backbone.wte
    form = linear_map(head.linear_form, model.cfg.d_model, embedding, head_name(head))  # P (D, K), W (V, K)
    if form.bias is not None:
        raise ConfigError(f"head {head_name(head)!r} has an output bias, which GPT-2's lm_head does not")
    if form.weight is embedding.weight and is_identity(form.hidden):
        return None
    return (form.hidden @ form.weight.T).T.contiguous()  # (V, D)


def to_gpt2(model):
    """The ``GPT2LMHeadModel`` computing what ``model`` computes, and a note on its output layer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    reasons = unsupported(model)
    if reasons:
        raise ConfigError(f"GPT-2 cannot compute this model exactly: {'; '.join(reasons)}")
    cfg, backbone = model.cfg, model.backbone
    weight = output_matrix(model)
    config = GPT2Config(
        vocab_size=backbone.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_ratio * cfg.d_model,
        activation_function="gelu_new" if cfg.gelu == "tanh" else "gelu",  # as F.gelu(approximate=...)
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=weight is None,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": backbone.wte.weight, "transformer.wpe.weight": backbone.wpe.weight}
    for i, block in enumerate(backbone.blocks):
        for theirs, ours in {**_NORMS, **_LINEARS}.items():
            module = block.get_submodule(ours)
            w = module.weight if theirs in _NORMS else module.weight.T  # GPT-2's Conv1D is (in, out)
            state[f"transformer.h.{i}.{theirs}.weight"] = w
            state[f"transformer.h.{i}.{theirs}.bias"] = _bias(module)
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = (
        backbone.ln_f.weight,
        _bias(backbone.ln_f),
    )
    if weight is not None:
        state["lm_head.weight"] = weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and weight is None)]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    if weight is None:
        hf.tie_weights()
        note = "tied: lm_head is the token embedding (tie_word_embeddings)"
    else:
        note = f"head {head_name(model.head)!r} folded into an untied lm_head (logits = h @ lm_head.T)"
    return hf, note


#: GPT-2's options (and their defaults) as lmheads' backbone computes them: others change the model.
COMPUTES = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "layer_norm_epsilon": 1e-5}

#: GPT-2 activations by the GELU lmheads computes the same way (``model.backbone.gelu``).
GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@torch.no_grad()
def init_from_gpt2(model, folder: str | Path) -> str:
    """Set ``model``'s backbone from a local GPT-2 folder (``GPT2LMHeadModel.save_pretrained``'s), and a
    head's own output matrix (``untied``) from its ``lm_head``: the pretrained model, with this head.
    Heads that add to the tie (a bias, a low-rank correction, a projection) keep their own
    initialisation. A backbone or vocabulary of another shape is one ``ConfigError`` naming the options
    that would match. Returns what was loaded."""
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
    run = (
        folder
        if (folder / "checkpoints").is_dir()
        else run_of_checkpoint(folder)
        if folder.is_file()
        else None
    )
    lmheads_run = (
        f"; {run} is an lmheads run: `python -m lmheads export {run} DIR` writes its model as such a folder "
        "(where GPT-2 computes it), or continue the run itself with --ckpt_path"
        if run is not None
        else ""
    )
    if not folder.is_dir():
        raise ConfigError(
            f"model.init_from {str(folder)!r} is not a folder; give a GPT-2 model's folder "
            f"(save_pretrained's){lmheads_run}"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.init_from {str(folder)!r}: no readable config.json ({err}){lmheads_run}"
        ) from None
    if config.get("model_type") != "gpt2":
        raise ConfigError(
            f"model.init_from {str(folder)!r} is a {config.get('model_type')!r} model; lmheads starts from "
            "GPT-2 models (model_type gpt2)"
        )
    cfg, D = model.cfg, config["n_embd"]
    wanted = {
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "d_model": D,
        "mlp_ratio": (config.get("n_inner") or 4 * D) / D,
        "gelu": GELU.get(config.get("activation_function", "gelu_new"), "unknown"),
        "positions": "learned",
        "bias": True,
        "d_embed": None,
        "layer_sharing": "none",
        "scale_embedding": False,
    }
    differ = [f"--model.backbone.{k}={str(v).lower()}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.block_size > config["n_positions"]:
        differ.append(f"--model.backbone.block_size={config['n_positions']} (or less)")
    if differ:
        raise ConfigError(
            f"model.init_from {str(folder)!r} is a GPT-2 of another shape: set {' '.join(differ)}"
        )
    otherwise = [f"{k}={config[k]} (lmheads: {v})" for k, v in COMPUTES.items() if config.get(k, v) != v]
    if otherwise:
        raise ConfigError(
            f"model.init_from {str(folder)!r} computes what lmheads' backbone does not: "
            + "; ".join(otherwise)
        )
    if model.backbone.vocab_size != config["vocab_size"]:
        raise ConfigError(
            f"model.init_from {str(folder)!r} has {config['vocab_size']:,} tokens and the data "
            f"{model.backbone.vocab_size:,}: give --data.tokenizer=pretrained --data.tokenizer_path={folder}"
        )
    try:
        hf = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    except Exception as err:  # transformers' OSError for no weights file, safetensors' own for a bad one
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.init_from {str(folder)!r}: its weights cannot be loaded ({first}); give a folder that "
            "save_pretrained wrote, with its model.safetensors or pytorch_model.bin"
        ) from None
    backbone = model.backbone
    backbone.wte.weight.copy_(hf["transformer.wte.weight"])
    backbone.wpe.weight.copy_(hf["transformer.wpe.weight"][: cfg.block_size])
    for i, block in enumerate(backbone.blocks):
        for theirs, ours in {**_NORMS, **_LINEARS}.items():
            module = block.get_submodule(ours)
            weight = hf[f"transformer.h.{i}.{theirs}.weight"]
            module.weight.copy_(weight if theirs in _NORMS else weight.T)
            module.bias.copy_(hf[f"transformer.h.{i}.{theirs}.bias"])
    backbone.ln_f.weight.copy_(hf["transformer.ln_f.weight"])
    backbone.ln_f.bias.copy_(hf["transformer.ln_f.bias"])
    loaded = f"model.init_from: the backbone from {folder}"
    if model.head.has_output_matrix:  # its own (V, D) matrix starts as the pretrained output layer
        model.head.weight.copy_(hf.get("lm_head.weight", hf["transformer.wte.weight"]))
        loaded += ", the head's own output matrix from its lm_head"
    return loaded


def _bias(module: nn.Module) -> Tensor:
    """A module's bias, or zeros where it has none (the same computation as no bias)."""
    bias = getattr(module, "bias", None)
    return bias if bias is not None else torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)


def export_hf(model, out: str | Path, tokenizer: Tokenizer | None = None) -> list[str]:
    """Write ``model`` (and its tokenizer) as an HF folder ``out``, which must not exist; returns what the
    export did, one line each. The folder is written beside ``out`` and renamed into place, so a failed
    export leaves nothing."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; give a new folder for the export")
    from transformers.utils import logging

    logging.disable_progress_bar()  # a command's output is lines
    reasons = unsupported(model.eval())
    make_folder(out.parent, "give another folder for the export")
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        if reasons:  # exact with a modeling file of its own, rather than refused
            from lmheads.hf_remote import export_remote

            notes = [export_remote(model, staging, reasons)]
        else:
            hf, note = to_gpt2(model)
            notes = [f"GPT2LMHeadModel: {note}"]
            hf.save_pretrained(staging)
        if tokenizer is not None:
            hf_tokenizer(tokenizer).save_pretrained(staging)
            whose = (
                f"the pretrained tokenizer of {tokenizer.folder}"
                if isinstance(tokenizer, PretrainedTokenizer)
                else f"lmheads' {tokenizer.kind} tokenizer"
            )
            notes.append(f"tokenizer: {whose} as tokenizer.json")
        else:
            notes.append("no tokenizer: the data has no text (the synthetic language's ids are its tokens)")
        os.rename(staging, out)
    except Exception as err:
        if (full := failed_write(err)) is None:
            raise
        raise ConfigError(
            f"the export {out} could not be written ({full.strerror}); {mend(full)}, or give a folder "
            "elsewhere"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return notes


def from_checkpoint(path: str | Path):
    """The model of an lmheads checkpoint (:func:`lmheads.run.layout.checkpoint_file`), the tokenizer of
    the data it trained on (``None`` for data without text), and the checkpoint as read (its tensors
    memory-mapped)."""
    from lmheads.checkpointing import read_checkpoint
    from lmheads.dotted import class_of
    from lmheads.module import module_from_checkpoint
    from lmheads.run.layout import checkpoint_file

    path = checkpoint_file(path)
    checkpoint = read_checkpoint(str(path))  # one line for an unreadable file
    model = module_from_checkpoint(str(path), checkpoint)
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    cls = class_of(str(data.pop("_class_path", "")))
    data.pop("_instantiator", None)
    if cls is None or "tokenizer" not in data:
        return model, None, checkpoint
    return model, cls(**data).tokenizer, checkpoint  # the tokenizer is cached with the data; rebuilt if not


def main(argv: list[str]) -> None:
    """``python -m lmheads export CHECKPOINT OUT_DIR``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lmheads export",
        description="Write a checkpoint (or a run folder's last.ckpt) as an HF transformers model that "
        "AutoModelForCausalLM and AutoTokenizer load without lmheads (pip install -e '.[hf]'): "
        "GPT2LMHeadModel where it computes the same, else a model with a modeling file of its own "
        "(trust_remote_code=True). A head of your own that is not a linear form has no exported form.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its checkpoints/last.ckpt)")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--to", choices=["hf"], default="hf", help="the format (HF transformers)")
    args = parser.parse_args(argv)
    require("python -m lmheads export", "hf", "transformers")
    if Path(args.out).exists():  # before reading anything
        raise ConfigError(f"{args.out} exists; give a new folder for the export")
    model, tokenizer, _ = from_checkpoint(args.checkpoint)
    for line in export_hf(model, args.out, tokenizer):
        print(line)
    print(f"wrote {args.out}")
