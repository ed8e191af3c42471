"""Models GPT-2 cannot compute, exported with a modeling file of their own (``trust_remote_code=True``).

The folder holds ``modeling_lmheads.py``: lmheads' backbone module copied as it is (it imports nothing
of lmheads but its error type, defined there instead), so rotary positions, a factorised or scaled input
embedding and shared layers compute exactly what they compute here, and an output layer that covers
every registered head:

- a linear head, logits = cap(s (h P) W^T + b): W is the token embedding itself where the head ties
  (``tie_word_embeddings``: one tensor in the file and after loading), else the head's one matrix
  (a low-rank correction or a projection folded in); P only where the head projects h before a tied W
  (``projected_tied``); the bias, scale and soft-cap where the head has them;
- the mixture of softmaxes (Yang et al. 2018), over the tied embedding.

The backbone attends to every earlier token and has no attention mask, so a padded batch is computed a
row at a time, each from its own tokens: exactly what the row gives alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

import lmheads.backbone
from lmheads.errors import ConfigError
from lmheads.heads import LinearHead, head_name
from lmheads.hf import is_identity, linear_map

_CONFIG = '''"""lmheads' decoder (exported by `python -m lmheads export`)."""

from transformers import PretrainedConfig


class LMHeadsConfig(PretrainedConfig):
    model_type = "lmheads"

    def __init__(self, vocab_size=1, backbone=None, head=None, **kwargs):
        self.vocab_size = vocab_size
        self.backbone = backbone or {}
        self.head = head or {}
        # the usual names, for code that reads them (generation among it)
        self.num_hidden_layers = self.backbone.get("n_layer", 1)
        self.num_attention_heads = self.backbone.get("n_head", 1)
        self.hidden_size = self.backbone.get("d_model", 1)
        self.max_position_embeddings = self.backbone.get("block_size", 1)
        kwargs.setdefault("use_cache", False)  # no key-value cache: each step reads the whole context
        super().__init__(**kwargs)
'''

_MODEL = '''

# ---- lmheads' output layer and the HF model ------------------------------------------------------
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_lmheads import LMHeadsConfig

_TIED = {"lm_head.weight": "backbone.wte.weight"}


class LMHeadsForCausalLM(PreTrainedModel, GenerationMixin):
    """lmheads' backbone and head: logits = cap(s (h P) W^T + b), or the mixture of softmaxes."""

    config_class = LMHeadsConfig
    base_model_prefix = "backbone"
    _tied_weights_keys = _TIED if int(transformers.__version__.split(".")[0]) >= 5 else list(_TIED)

    def __init__(self, config):
        super().__init__(config)
        head, V = config.head, config.vocab_size
        self.backbone = Backbone(V, BackboneConfig(**config.backbone))
        D, E = self.backbone.cfg.d_model, self.backbone.cfg.embed_width
        width = E if head["tied"] else D
        self.lm_head = nn.Linear(width, V, bias=False)
        self.projection = nn.Parameter(torch.zeros(D, width)) if head.get("projection") else None
        self.output_bias = nn.Parameter(torch.zeros(V)) if head.get("bias") else None
        if head["kind"] == "mos":
            self.latent = nn.Linear(D, head["components"] * E)
            self.prior = nn.Linear(D, head["components"])
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.wte

    def set_input_embeddings(self, value):
        self.backbone.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def _cap(self, logits):
        cap = self.config.head.get("softcap")
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def logits(self, h):
        head = self.config.head
        if head["kind"] == "mos":  # Yang et al. (2018): p = sum_k pi_k softmax(tanh(P_k h) E^T)
            k, e = head["components"], self.backbone.cfg.embed_width
            latent = torch.tanh(self.latent(h)).unflatten(-1, (k, e)) * head["scale"]
            component = self._cap(F.linear(latent, self.lm_head.weight))
            log_prior = self.prior(h).float().log_softmax(-1).unsqueeze(-1)
            return torch.logsumexp(log_prior + component.float().log_softmax(-1), dim=-2)
        hidden = h if self.projection is None else h @ self.projection
        bias = None if self.output_bias is None else self.output_bias * head["scale"]
        return self._cap(F.linear(hidden * head["scale"], self.lm_head.weight, bias))

    def _init_weights(self, module):
        if isinstance(module, Rotary):  # derived tables, not stored in the file: computed again
            cfg = self.backbone.cfg
            fresh = Rotary(cfg.d_model // cfg.n_head, cfg.block_size, cfg.rope_base)
            module.cos, module.sin = fresh.cos.to(module.cos.device), fresh.sin.to(module.sin.device)

    def _window(self, input_ids):
        context = input_ids[:, -self.backbone.cfg.block_size :]  # what lmheads' generate reads too
        return self.logits(self.backbone(context))

    def _padded(self, input_ids, attention_mask):
        """Each row from its own tokens alone, as if given unpadded; zeros at the padding."""
        B, T = input_ids.shape
        out = None
        for i, keep in enumerate(attention_mask.bool()):
            where = keep.nonzero().flatten()
            if len(where) == 0:
                continue
            start, end = int(where[0]), int(where[-1]) + 1
            if end - start != len(where):
                raise ValueError(
                    f"row {i} of attention_mask has gaps: lmheads' model takes left or right padding only"
                )
            row = self._window(input_ids[i : i + 1, start:end])[0]  # (n, V), n <= block_size
            if out is None:
                out = row.new_zeros(B, T, row.shape[-1])
            out[i, end - row.shape[0] : end] = row
        if out is None:
            raise ValueError("attention_mask masks every token")
        return out[:, -min(T, self.backbone.cfg.block_size) :]

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kwargs):
        if attention_mask is None or bool(attention_mask.all()):
            logits = self._window(input_ids)
        else:  # the backbone attends to every token before a position: padding is taken out instead
            logits = self._padded(input_ids, attention_mask)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].flatten(0, 1).float()
            targets = labels[:, -logits.shape[1] :][:, 1:].flatten()  # the positions the logits cover
            loss = F.cross_entropy(shifted, targets, ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
'''


def modeling_source() -> str:
    """``modeling_lmheads.py``: lmheads' backbone module as it is, then the output layer and HF model."""
    source = Path(lmheads.backbone.__file__).read_text()
    own = "from lmheads.errors import ConfigError\n"
    if own not in source or "from lmheads" in source.replace(own, ""):
        raise RuntimeError("lmheads.backbone imports more of lmheads than its error type")
    return source.replace(own, "\nclass ConfigError(ValueError):\n    pass\n") + _MODEL


@torch.no_grad()
def head_spec(model) -> tuple[dict, dict[str, Tensor], str]:
    """The output layer of ``model`` for the modeling file: its options, its tensors (by their names in
    the HF model) and a note on the form used."""
    head, embedding = model.head, model.backbone.wte
    scale, softcap = float(head.logit_multiplier), head.softcap
    if not isinstance(head, LinearHead):
        if head_name(head) != "mos":
            raise ConfigError(
                f"head {head_name(head)!r} is not a linear form, and the exported modeling file computes "
                "only linear heads and mos: give the head a project() (a LinearHead) to export it, or "
                "evaluate the checkpoint with lmheads (validate, test, predict)"
            )
        spec = {
            "kind": "mos",
            "tied": True,
            "components": head.components,
            "scale": scale,
            "softcap": softcap,
        }
        tensors = {f"{name}.{p}": getattr(head, name).get_parameter(p) for name in ("latent", "prior")
                   for p in ("weight", "bias")}  # fmt: skip
        return spec, tensors, "the mixture of softmaxes over the tied embedding (modeling_lmheads.py)"
    raw = linear_map(head.project, model.cfg.d_model, embedding, head_name(head))  # before the scale
    spec = {"kind": "linear", "bias": raw.bias is not None, "scale": scale, "softcap": softcap}
    tensors = {} if raw.bias is None else {"output_bias": raw.bias}
    if raw.weight is embedding.weight:  # the tie, kept: W is E
        spec["tied"] = True
        spec["projection"] = not is_identity(raw.hidden)
        if spec["projection"]:
            tensors["projection"] = raw.hidden  # (D, E)
        form = "tied" + (", with the head's projection of h" if spec["projection"] else "")
    else:
        spec["tied"], spec["projection"] = False, False
        tensors["lm_head.weight"] = (raw.hidden @ raw.weight.T).T.contiguous()  # (V, D)
        form = "untied lm_head (the head's matrix folded into one)"
    extras = [
        "bias" * spec["bias"],
        f"logit scale {scale:g}" * (scale != 1.0),
        f"soft-cap {softcap}" * (softcap is not None),
    ]
    return spec, tensors, form + "".join(f", {e}" for e in extras if e)


def export_remote(model, folder: Path, reasons: list[str]) -> str:
    """Write ``model`` into ``folder`` as ``LMHeadsForCausalLM`` with its modeling file; a note."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec, tensors, form = head_spec(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_lmheads.py").write_text(_CONFIG)
    (folder / "modeling_lmheads.py").write_text(modeling_source())
    (folder / "__init__.py").write_text("")
    config = {
        "model_type": "lmheads",
        "architectures": ["LMHeadsForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_lmheads.LMHeadsConfig",
            "AutoModelForCausalLM": "modeling_lmheads.LMHeadsForCausalLM",
        },
        "vocab_size": model.backbone.vocab_size,
        "backbone": asdict(model.cfg),
        "head": spec,
        "tie_word_embeddings": spec["tied"],
        "use_cache": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                          trust_remote_code=True)  # fmt: skip
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update(tensors)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and spec["tied"])]
    buffers = {name for name, _ in hf.named_buffers()}
    if [k for k in missing if k not in buffers] or unexpected:
        raise RuntimeError(f"lmheads mapping incomplete: missing {missing}, unexpected {unexpected}")
    if spec["tied"]:
        hf.tie_weights()
    hf.save_pretrained(folder)
    why = "; ".join(reasons)
    return f"LMHeadsForCausalLM with modeling_lmheads.py (trust_remote_code=True), because {why}: {form}"
