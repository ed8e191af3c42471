"""lm-evaluation-harness on a run (lmheads.harness): the export scored by lm-eval's HF model class, the
results filed in the run and read by compare.py, and lmheads' offline WikiText-2 task agreeing with
lmheads' own test bits per byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lmheads.harness import document_start, main
from lmheads.runlog import find_runs, load_run

from .helpers import fit, only_run, scalars, tool
from .helpers import main as lmheads

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def _text(path: Path, source: str, lines: int, fallback: int) -> Path:
    """The first lines of WikiText-2's file where the reference data is at hand; else word lines."""
    if (WIKITEXT / source).is_file():
        path.write_text("".join((WIKITEXT / source).read_text().splitlines(keepends=True)[:lines]))
    else:
        path.write_text("".join(f" w{i % 97} w{i % 89} w{(i * 7) % 83} . \n" for i in range(fallback)))
    return path


@pytest.fixture
def word_run(tmp_path):
    data = [
        "--data=lmheads.data.TextDataModule",
        "--data.tokenizer=word",
        f"--data.train_file={_text(tmp_path / 'train.txt', 'train.txt', 300, 600)}",
        f"--data.validation_file={_text(tmp_path / 'valid.txt', 'valid.txt', 40, 80)}",
        f"--data.test_file={_text(tmp_path / 'test.txt', 'test.txt', 40, 80)}",
        "--data.batch_size=4",
        "--model.backbone.block_size=32",
    ]
    fit(tmp_path, *data, steps=4, every=2)
    run = only_run(tmp_path)
    lmheads(
        ["test", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    )
    return tmp_path, run


def test_a_run_is_scored_by_lm_eval_and_its_bits_per_byte_agree_with_lmheads(word_run, capsys, caplog):
    """The offline task scores the run's test file in rolling windows of the model's context; lmheads'
    test scores it in blocks of the same length. The two differ only at the windows' edges."""
    tmp_path, run = word_run
    main([str(run)])
    out = capsys.readouterr().out
    assert not [r for r in caplog.records if "is defined, but" in r.getMessage()]  # metrics fully given
    assert "GPT2LMHeadModel" in out and f"harness: filed in {run / 'harness' / 'last'}" in out
    filed = run / "harness" / "last"
    record = json.loads((filed / "results.json").read_text())
    assert json.loads((filed / "checkpoint.json").read_text())["step"] == 4
    bpb = record["metrics"]["lmheads_wikitext2 bits_per_byte"]
    own = scalars(run / "test" / "last")["test/bpb"][-1][1]
    assert bpb == pytest.approx(own, rel=0.01)
    assert record["metrics"]["lmheads_wikitext2 word_perplexity"] > 1
    # compare.py shows it as a column of the run's row
    assert load_run(run).harness == {f"lm-eval {k}": v for k, v in record["metrics"].items()}
    (logged,) = find_runs([tmp_path / "quickstart"])
    assert logged.harness["lm-eval lmheads_wikitext2 bits_per_byte"] == bpb
    table = tool("compare").table({"tied": [logged]})
    assert "lm-eval lmheads_wikitext2 bits_per_byte" in table and f"{bpb:.4f}" in table
    main([str(run), "--limit", "1"])  # again, on one document: numbered, the first kept and still shown
    assert sorted(p.name for p in (run / "harness").iterdir()) == ["last", "last-2"]
    other = json.loads((run / "harness" / "last-2" / "checkpoint.json").read_text())["other_data"]
    assert other == ["--limit 1: the first documents of each task"]
    assert (
        f"filed in {run / 'harness' / 'last-2'}, on data or settings other than the run's ({other[0]})"
        in (capsys.readouterr().out)
    )
    assert load_run(run).harness == {f"lm-eval {k}": v for k, v in record["metrics"].items()}


def test_a_character_run_is_scored_after_a_line_break(tmp_path, capsys):
    """The character tokenizer has no end-of-text token for lm-eval to start a document after (it failed
    on one); a line break stands for it, and the score agrees with lmheads' test as for words. Rotary
    positions and an output bias, which GPT-2 does not compute: lm-eval runs lmheads' modeling file (it
    refused to)."""
    text = "".join(f"line {i}: the {i % 7} cats sat on {i % 11} mats\n" for i in range(400))
    for name, part in (("train.txt", text[:12000]), ("test.txt", text[12000:])):
        (tmp_path / name).write_text(part)
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=char", "--data.batch_size=4",
            f"--data.train_file={tmp_path / 'train.txt'}", f"--data.test_file={tmp_path / 'test.txt'}",
            "--model.backbone.block_size=64", "--model.backbone.positions=rope",
            "--model.head=tied_bias"]  # fmt: skip
    fit(tmp_path, *data, steps=4, every=2)
    run = only_run(tmp_path)
    lmheads(
        ["test", "--config", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    )
    capsys.readouterr()
    main([str(run)])
    assert "LMHeadsForCausalLM" in capsys.readouterr().out
    record = json.loads((run / "harness" / "last" / "results.json").read_text())
    own = scalars(run / "test" / "last")["test/bpb"][-1][1]
    assert record["metrics"]["lmheads_wikitext2 bits_per_byte"] == pytest.approx(own, rel=0.01)
    # other text with characters the run never saw (Z, b, r, !: 6 of 34): scored as <unk>, as fit says
    (tmp_path / "other.txt").write_text("the cats sat on 3 mats\nZebras! ZZ\n")
    main([str(run), "--text", str(tmp_path / "other.txt"), "--limit", "1"])
    note = f"harness: 17.65% of the tokens of {tmp_path / 'other.txt'} are outside the run's vocabulary; the "
    assert (
        note + "model reads them as <unk>, and is scored on predicting <unk> there" in capsys.readouterr().out
    )


def test_a_document_starts_after_an_end_of_text_token_or_a_line_break():
    from lmheads.data.tokenizers import ByteTokenizer, CharTokenizer
    from lmheads.errors import ConfigError

    assert document_start(CharTokenizer(["\n", "a", "b"])) == 1 and document_start(ByteTokenizer()) is None
    with pytest.raises(ConfigError, match="this run's characters hold none"):
        document_start(CharTokenizer(["a", "b"]))


@pytest.mark.gpu
def test_on_a_gpu_lm_eval_scores_there_as_on_the_cpu(word_run):
    _, run = word_run
    main([str(run), "--device", "cpu"])
    main([str(run)])  # on the GPU torch sees
    cpu, gpu = (
        json.loads((run / "harness" / name / "results.json").read_text()) for name in ("last", "last-2")
    )
    assert (cpu["device"], gpu["device"]) == ("cpu", "cuda")
    key = "lmheads_wikitext2 bits_per_byte"
    assert gpu["metrics"][key] == pytest.approx(cpu["metrics"][key], rel=1e-4)


def test_bad_input_is_one_error_and_writes_nothing(word_run, tmp_path, capsys, monkeypatch):
    import lm_eval

    from lmheads.errors import ConfigError

    _, run = word_run
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state["datamodule_hyper_parameters"]["test_file"] = None  # a run trained on a file, tested on none
    torch.save(state, run / "checkpoints" / "no-test.ckpt")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        lmheads(["harness", str(run), "--tasks", "no_such_task"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and err.count("error:") == 1 and "lm-eval knows no task no_such_task" in err
    assert out == ""  # refused before the export
    with pytest.raises(ConfigError, match="this run's data has no test_file: give --text FILE"):
        main([str(run / "checkpoints" / "no-test.ckpt")])
    assert "GPT2LMHeadModel" not in capsys.readouterr().out  # refused before the export
    with pytest.raises(ConfigError, match="exists; give a new folder"):
        main([str(run), "--out", str(run)])
    with pytest.raises(
        ConfigError, match=r"^--text is the text of task lmheads_wikitext2: add it to --tasks"
    ):
        main([str(run), "--tasks", "lambada_openai", "--text", str(tmp_path / "t.txt")])
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))  # a traceback from datasets
    with pytest.raises(ConfigError, match=r"^--text '.*latin1.txt' is not UTF-8 text \(byte 3"):
        main([str(run), "--text", str(tmp_path / "latin1.txt")])
    (tmp_path / "a file").write_text("")
    with pytest.raises(
        ConfigError, match=r"^--out .*a file/out cannot be made: .*a file is a file; give another --out"
    ):
        main([str(run), "--out", str(tmp_path / "a file" / "out")])
    for option in ("--batch_size", "--limit"):  # lm-eval ended these in a traceback
        with pytest.raises(ConfigError, match=f"^{option} 0: give a positive number$"):
            main([str(run), option, "0"])
    with pytest.raises(ConfigError, match=r"^--device gpu0: 'gpu0' is not a torch device"):
        main([str(run), "--device", "gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError, match=r"^--device cuda: torch sees no CUDA device here; give --device cpu$"
        ):
            main([str(run), "--device", "cuda"])
    with pytest.raises(ConfigError, match=r"is not an lmheads checkpoint|not a checkpoint of a run"):
        (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
        main([str(tmp_path / "x.ckpt")])

    def offline(**kwargs):  # as datasets fails for a task whose data is on the Hub, without a network
        assert kwargs["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
        raise ConnectionError(
            "Couldn't reach 'EleutherAI/lambada_openai' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(SystemExit) as stop:
        lmheads(["harness", str(run), "--tasks", "lambada_openai"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    assert "lm-eval could not load the data of lambada_openai (Couldn't reach" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_the_synthetic_language_has_no_text_to_score(tmp_path):
    from lmheads.errors import ConfigError

    fit(tmp_path, steps=2, every=2)
    run = only_run(tmp_path)
    with pytest.raises(ConfigError, match="lm-eval scores text"):
        main([str(run)])
    assert not (run / "harness").exists()
