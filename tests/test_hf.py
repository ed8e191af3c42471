"""Export to HF transformers: every registered head exports exactly (GPT2LMHeadModel, equal logits) or is
refused with its reason; the tie survives saving and loading; tokenizers keep their ids."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from lmheads.backbone import BackboneConfig
from lmheads.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, WordTokenizer
from lmheads.errors import ConfigError
from lmheads.heads import Head, registered_heads
from lmheads.module import LMHeadModule

from .external_heads import CosineTiedHead
from .helpers import fit, only_run, run_lmheads

transformers = pytest.importorskip("transformers")
from lmheads.hf import export_hf  # noqa: E402
from lmheads.hf_tokenizer import hf_tokenizer  # noqa: E402

BUILTIN = sorted(n for n, c in registered_heads().items() if c.__module__.startswith("lmheads."))
#: Heads GPT-2 cannot compute: exported with lmheads' modeling file (trust_remote_code), and why.
REMOTE = {"tied_bias": "has an output bias", "mos": "is not a linear form"}
SMALL = BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=12)


def _model(name: str, **backbone) -> LMHeadModule:
    torch.manual_seed(0)
    model = LMHeadModule(
        head=registered_heads()[name](), backbone=BackboneConfig(**{**vars(SMALL), **backbone}), vocab_size=50
    )
    with torch.no_grad():
        for p in model.head.parameters():  # no zero-initialised part stays zero
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _check_export(model: LMHeadModule, folder, tied: bool) -> object:
    """The export in ``folder`` loads with AutoModelForCausalLM, gives ``model``'s logits within 1e-5 in
    fp32, generates, keeps the tie (one tensor, one ``data_ptr``) through a save/load round trip or has
    none; the loaded model."""
    remote = (folder / "modeling_lmheads.py").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    assert type(loaded).__name__ == ("LMHeadsForCausalLM" if remote else "GPT2LMHeadModel")
    idx = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx), rtol=0, atol=1e-5)
    embedding = loaded.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()) == tied
    out = loaded.generate(idx[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 9)
    loaded.save_pretrained(folder.parent / f"{folder.name}-again")  # a round trip keeps the tie or none
    again = transformers.AutoModelForCausalLM.from_pretrained(folder.parent / f"{folder.name}-again",
                                                              trust_remote_code=remote)  # fmt: skip
    assert (
        again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    ) == tied
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in set(f.keys())) != tied
    return loaded


@pytest.mark.parametrize("name", BUILTIN)
def test_every_head_exports_with_equal_logits(name, tmp_path):
    """GPT-2 where it computes the same; lmheads' modeling file (trust_remote_code) where it does not."""
    model = _model(name)
    notes = export_hf(model, tmp_path / "hf")
    tied = name in ("tied", "tied_bias", "mos")
    _check_export(model, tmp_path / "hf", tied)
    if name in REMOTE:
        assert "trust_remote_code=True" in notes[0] and REMOTE[name] in notes[0], notes
    else:
        assert ("tie_word_embeddings" in notes[0]) == tied and ("folded" in notes[0]) != tied


@pytest.mark.parametrize(
    ("head", "options", "backbone", "reason"),
    [
        ("tied", {}, {"positions": "rope"}, "positions=rope"),
        ("projected_tied", {}, {"d_embed": 8}, "a factorised embedding"),
        ("tied", {}, {"layer_sharing": "all"}, "layer_sharing=all"),
        ("tied", {}, {"scale_embedding": True}, "scale_embedding"),
        ("untied", {"softcap": 30.0}, {}, "softcap=30.0"),
        ("tied", {"logit_scale": "inv_sqrt_d"}, {"positions": "rope", "bias": False}, "positions=rope"),
    ],
)
def test_what_gpt2_does_not_compute_goes_with_a_modeling_file(head, options, backbone, reason, tmp_path):
    """Rotary positions, a factorised or scaled embedding, shared layers, a soft-cap: exact through
    lmheads' own modeling file, which imports nothing of lmheads, and the note says why."""
    torch.manual_seed(0)
    model = LMHeadModule(
        head=registered_heads()[head](**options), backbone=BackboneConfig(**{**vars(SMALL), **backbone}),
        vocab_size=50,
    ).eval()  # fmt: skip
    notes = export_hf(model, tmp_path / "hf")
    assert reason in notes[0] and "modeling_lmheads.py" in notes[0]
    assert "from lmheads" not in (tmp_path / "hf" / "modeling_lmheads.py").read_text()
    _check_export(model, tmp_path / "hf", tied=head != "untied")


def test_the_modeling_file_takes_padded_batches_as_rows_alone(tmp_path):
    """Left padding (batched generation, lm-evaluation-harness) and right padding give each row the
    logits and the continuation it has alone; a mask with gaps is refused; labels longer than the
    context are scored on the positions the logits cover."""
    model = _model("tied", layer_sharing="all")  # learned positions: padding would shift them
    export_hf(model, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])
    left, right = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]), torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        alone = loaded(b).logits[0]
        out = loaded(left, attention_mask=(left > 0).long()).logits
        torch.testing.assert_close(out[1, 2:], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[0], loaded(a).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded(right, attention_mask=(right > 0).long()).logits[1, :2], alone)
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        batched = loaded.generate(left, attention_mask=(left > 0).long(), **kwargs)
        assert batched[1, 4:].tolist() == loaded.generate(b, **kwargs)[0, 2:].tolist()
        with pytest.raises(ValueError, match="row 0 of attention_mask has gaps"):
            loaded(left, attention_mask=torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]]))
        long = torch.randint(1, 50, (2, 20))  # past block_size 12: the last 12 positions are scored
        loss = loaded(long, labels=long).loss
        window = long[:, -12:]
        assert torch.isclose(loss, loaded(window, labels=window).loss)


def test_a_backbone_without_biases_exports_with_zero_biases(tmp_path):
    model = _model("untied", bias=False)
    export_hf(model, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx), rtol=0, atol=1e-5)


class GatedTied(Head):
    """A head of a user's own that is not a linear form (no ``project``) and not lmheads' ``mos``."""

    def _create_parameters(self) -> None:
        self.gate = torch.nn.Linear(self.d_model, self.d_model)

    def logits(self, h, embedding):
        return (torch.sigmoid(self.gate(h)) * h) @ embedding.weight.T


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (GatedTied, "'GatedTied' is not a linear form"),
        (CosineTiedHead, "'test_cosine_tied': its h' is not a linear map of h"),  # h normalised
    ],
)
def test_a_head_with_no_exported_form_is_refused_and_writes_nothing(head, reason, tmp_path):
    model = LMHeadModule(head=head(), backbone=SMALL, vocab_size=50).eval()
    with pytest.raises(ConfigError, match=f"{re.escape(reason)}.*evaluate the checkpoint with lmheads"):
        export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error ("I/O error: ... (os error 28)"), which ended the
    command in a traceback; the staged folder is removed either way."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    model = LMHeadModule(backbone=SMALL, vocab_size=50).eval()
    message = f"the export {tmp_path / 'hf'} could not be written (No space left on device); free space there"
    with pytest.raises(ConfigError, match=re.escape(message)):
        export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


TEXT = ["the cat sat on the mat\n", "a dog, a café and ünïcode words\n", "unseen zebra here\n"]


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_tokenizers_keep_their_ids(kind):
    train = TEXT[:2] * 3
    tokenizer = {
        "char": lambda: CharTokenizer.train(train),
        "byte": ByteTokenizer,
        "word": lambda: WordTokenizer.train(train),
        "bpe": lambda: BPETokenizer.train(train, vocab_size=300),
    }[kind]()
    fast = hf_tokenizer(tokenizer)
    for record in TEXT:  # a record of text: a line and its line break
        assert fast(record)["input_ids"] == tokenizer.encode(record), record
    assert fast("".join(TEXT))["input_ids"] == [i for r in TEXT for i in tokenizer.encode(r)]


def test_the_export_command_writes_a_folder_transformers_loads_alone(tmp_path):
    """A word-level run exported by the command: model and tokenizer load in a Python that does not
    import lmheads, and give its logits; a second export to the same folder, or of a file that is not a
    checkpoint, is one error line and writes nothing."""
    text = tmp_path / "train.txt"
    text.write_text("".join(f"w{i % 7} w{i % 5} w{i % 3}\n" for i in range(400)))
    data = ["--data=lmheads.data.TextDataModule", f"--data.train_file={text}", "--data.tokenizer=word"]
    cli = fit(tmp_path, *data, "--data.batch_size=4", "--model.backbone.block_size=16", steps=2, every=2)
    run = only_run(tmp_path)
    result = run_lmheads("export", str(run), str(tmp_path / "hf"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokenizer: lmheads' word tokenizer as tokenizer.json" in result.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "auto_map" not in config
    idx = cli.datamodule.tokenizer.encode("w1 w2 w3\n") + cli.datamodule.tokenizer.encode("w4 w0\n")
    with torch.no_grad():
        expected = cli.model.eval()(torch.tensor([idx]))[0, -1]
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r})\n"
        "ids = t('w1 w2 w3\\nw4 w0\\n')['input_ids']\n"
        "print(json.dumps({'ids': ids, 'last': m(torch.tensor([ids])).logits[0, -1].tolist(),\n"
        "                  'lmheads': any(k.startswith('lmheads') for k in sys.modules)}))\n"
    )
    alone = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    got = json.loads(alone.stdout.strip().splitlines()[-1])
    assert got["ids"] == idx and not got["lmheads"]
    torch.testing.assert_close(torch.tensor(got["last"]), expected, rtol=0, atol=1e-5)
    again = run_lmheads("export", str(run), str(tmp_path / "hf"), cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().endswith("exists; give a new folder for the export")
    (tmp_path / "not.ckpt").write_bytes(b"nothing")
    bad = run_lmheads("export", str(tmp_path / "not.ckpt"), str(tmp_path / "hf2"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "cannot be read" in bad.stderr
    assert not (tmp_path / "hf2").exists()


def test_a_missing_checkpoint_or_model_folder_is_one_line_that_names_it(tmp_path):
    """export and harness take a checkpoint or a run folder; init_from a GPT-2 folder. A path that is
    none of them is named as missing, not as a file of the wrong kind."""
    from lmheads.hf import init_from_gpt2
    from lmheads.hf import main as export
    from lmheads.run.layout import checkpoint_file

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"'.*nope' does not exist; give a checkpoint file or a run folder"):
        export([str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(
        ConfigError, match=r"holds no checkpoints/last\.ckpt; give one of its checkpoint files"
    ):
        checkpoint_file(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert checkpoint_file(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = LMHeadModule(head=registered_heads()["tied"](), backbone=BackboneConfig(), vocab_size=8)
    with pytest.raises(ConfigError, match=r"model\.init_from '.*nope' is not a folder; give a GPT-2 model's"):
        init_from_gpt2(model, tmp_path / "nope")
    assert not (tmp_path / "out").exists()
    (tmp_path / "run" / "config.yaml").write_text("")  # an lmheads run: how to start from it
    for given, said in ((tmp_path / "run" / "checkpoints" / "last.ckpt", "is not a folder"),
                        (tmp_path / "run", "no readable config.json")):  # fmt: skip
        with pytest.raises(
            ConfigError, match=f"{said}.*; .*run is an lmheads run: `python -m lmheads export "
        ):
            init_from_gpt2(model, given)
    (tmp_path / "a file").write_text("")
    with pytest.raises(
        ConfigError, match=r"a file/sub cannot be made: .*a file is a file; give another folder"
    ):
        export_hf(model, tmp_path / "a file" / "sub" / "out")


GPT2_EOS = "<|endoftext|>"


def _local_gpt2(folder, vocab: list[str]):
    """A small randomly initialised GPT-2 (tanh GELU, as GPT-2's) saved as HF saves it, with a byte-level
    BPE tokenizer trained on ``vocab``'s words and GPT-2's one special token, saved as HF saves it: a
    pretrained model's folder, downloaded from nowhere."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[GPT2_EOS]
    )
    tokenizer.train_from_iterator(vocab, trainer=trainer)
    folder.mkdir()
    special = dict.fromkeys(("bos_token", "eos_token", "unk_token"), GPT2_EOS)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(folder)
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=16, n_layer=2, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", ["tied", "untied", "tied_bias"])
def test_a_model_starts_from_a_local_gpt2_with_its_own_head(name, tmp_path):
    """The pretrained model's logits, whatever the head: the tie reads its embedding, an untied head starts
    from its lm_head, a bias from zero."""
    from lmheads.hf import init_from_gpt2

    hf = _local_gpt2(tmp_path / "gpt2", TEXT * 20)
    cfg = BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=16, gelu="tanh")
    model = LMHeadModule(
        head=registered_heads()[name](), backbone=cfg, vocab_size=hf.config.vocab_size
    ).eval()
    said = init_from_gpt2(model, tmp_path / "gpt2")
    assert ("lm_head" in said) == (name == "untied")
    idx = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)
    if name != "tied_bias":  # and back, tanh GELU and all
        export_hf(model, tmp_path / "back")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        assert back.config.activation_function == "gelu_new"
        with torch.no_grad():
            torch.testing.assert_close(back(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)


def test_a_fit_starts_from_a_local_gpt2(tmp_path, capsys):
    hf = _local_gpt2(tmp_path / "gpt2", TEXT * 20)
    text = tmp_path / "train.txt"
    text.write_text("".join(TEXT * 40))
    data = ["--data=lmheads.data.TextDataModule", f"--data.train_file={text}", "--data.tokenizer=pretrained",
            f"--data.tokenizer_path={tmp_path / 'gpt2'}", "--data.batch_size=2"]  # fmt: skip
    backbone = ["--model.backbone.n_layer=2", "--model.backbone.n_head=2", "--model.backbone.d_model=16",
                "--model.backbone.block_size=16", "--model.backbone.gelu=tanh"]  # fmt: skip
    start = [f"--model.init_from={tmp_path / 'gpt2'}", "--model.head=untied", "--model.lr=1e-12"]
    cli = fit(tmp_path, *data, *backbone, *start, "--trainer.logger=false", steps=1, every=1)
    weights = hf.state_dict()
    close = {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(cli.model.backbone.wte.weight, weights["transformer.wte.weight"], **close)
    torch.testing.assert_close(cli.model.head.weight, weights["lm_head.weight"], **close)
    assert cli.datamodule.tokenizer.encode("the cat") == hf_tokenizer_ids(tmp_path / "gpt2", "the cat")
    from lmheads.hf import main as export  # and out again, with the pretrained model's tokenizer

    export([str(cli.plan.folder), str(tmp_path / "out")])
    assert (
        f"tokenizer: the pretrained tokenizer of {tmp_path / 'gpt2'} as tokenizer.json"
        in capsys.readouterr().out
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("the cat\n")["input_ids"] == cli.datamodule.tokenizer.encode("the cat\n")
    assert tokenizer.eos_token == tokenizer.bos_token == GPT2_EOS and len(tokenizer) == hf.config.vocab_size
    with pytest.raises(SystemExit) as exc:  # another shape: the options that would match, in one line
        fit(tmp_path / "wrong", *data, *backbone, "--model.backbone.n_layer=3", *start, steps=1, every=1)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "is a GPT-2 of another shape: set --model.backbone.n_layer=2" in err
    assert not (tmp_path / "wrong" / "quickstart").exists()  # refused at the start: no run folder


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True (lmheads: False)"),
        ("scale_attn_weights", False, "scale_attn_weights=False (lmheads: True)"),
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06 (lmheads: 1e-05)"),
    ],
)
def test_a_gpt2_that_computes_otherwise_is_refused(option, value, said, tmp_path):
    """A GPT-2 variant's weights would load into a backbone that computes something else."""
    from lmheads.hf import init_from_gpt2

    hf = _local_gpt2(tmp_path / "gpt2", TEXT * 20)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, option: value}))
    cfg = BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=16, gelu="tanh")
    model = LMHeadModule(head=registered_heads()["tied"](), backbone=cfg, vocab_size=hf.config.vocab_size)
    with pytest.raises(ConfigError, match=f"computes what lmheads' backbone does not: {re.escape(said)}$"):
        init_from_gpt2(model, tmp_path / "gpt2")


def test_a_gpt2_folder_without_readable_weights_is_one_line(tmp_path):
    """A folder with GPT-2's config.json and no weights file (or a truncated one, an LFS pointer) is named,
    not transformers' or safetensors' traceback."""
    from lmheads.hf import init_from_gpt2

    hf = _local_gpt2(tmp_path / "gpt2", TEXT * 20)
    cfg = BackboneConfig(n_layer=2, n_head=2, d_model=16, block_size=16, gelu="tanh")
    model = LMHeadModule(head=registered_heads()["tied"](), backbone=cfg, vocab_size=hf.config.vocab_size)
    weights = tmp_path / "gpt2" / "model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(
        ConfigError, match=r"model\.init_from '.*gpt2': its weights cannot be loaded \(.*header"
    ):
        init_from_gpt2(model, tmp_path / "gpt2")
    weights.unlink()
    with pytest.raises(
        ConfigError, match=r"its weights cannot be loaded \(.*no file named model\.safetensors"
    ):
        init_from_gpt2(model, tmp_path / "gpt2")


def hf_tokenizer_ids(folder, text: str) -> list[int]:
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))(text)[
        "input_ids"
    ]
