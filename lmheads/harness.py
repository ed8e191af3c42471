"""lm-evaluation-harness on a run: ``python -m lmheads harness CHECKPOINT --tasks TASK ...``.

The checkpoint is exported to HF transformers (:mod:`lmheads.hf`), lm-eval's HF model
class scores the export, and the results are filed in the run as an evaluation,
``<run>/harness/<checkpoint name>/results.json`` (numbered when repeated) beside ``checkpoint.json``;
``tools/compare.py`` shows them as columns (:func:`lmheads.runlog.load_run` reads them back).

``lmheads_wikitext2`` is a task of lmheads' own that needs no download: a text file (the run's
``data.test_file`` unless ``--text`` names another) scored as one document in rolling windows of the
model's context, with lm-eval's word perplexity, byte perplexity and bits per byte, as its ``wikitext``
task reports them on the hub's copy. Any task lm-eval knows can be named too, where its data is
available.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from lmheads.data.tokenizers import CharTokenizer
from lmheads.errors import ConfigError, file_in_the_way, require

#: lmheads' offline task: a local text file as one document.
LOCAL_TASK = "lmheads_wikitext2"
#: Where an evaluation by lm-eval is filed in its run.
HARNESS = "harness"


def _task_yaml(text: Path) -> str:
    data_files = json.dumps({"test": str(text.resolve())})
    return f"""task: {LOCAL_TASK}
dataset_path: text
dataset_kwargs:
  data_files: {data_files}
  sample_by: document
  encoding: utf-8-sig
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function words.process_results
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


_PROCESS_RESULTS = """import re


def process_results(doc, results):
    (loglikelihood,) = results
    words, size = len(re.split(r"\\s+", doc["text"].strip())), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
"""


@contextmanager
def task_manager(tasks: list[str], text: Path | None):
    """lm-eval's task index with ``lmheads_wikitext2`` over the file ``text`` in it (its files kept while
    the context lasts); a task lm-eval does not know is one line, before anything is exported."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="lmheads-tasks-") as tasks_dir:
        if LOCAL_TASK in tasks:
            (Path(tasks_dir) / f"{LOCAL_TASK}.yaml").write_text(_task_yaml(text))
            (Path(tasks_dir) / "words.py").write_text(_PROCESS_RESULTS)
        manager = TaskManager(include_path=tasks_dir, verbosity="ERROR")
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"lm-eval knows no task {', '.join(unknown)}; `lm_eval ls tasks` lists them")
        yield manager


def evaluate(
    model_dir: Path,
    tasks: list[str],
    manager,
    batch_size: int = 1,
    limit: int | None = None,
    device: str = "cpu",
    prefix_token_id: int | None = None,
) -> dict:
    """lm-eval's ``simple_evaluate`` of the HF model in ``model_dir`` on ``tasks`` of the
    :func:`task_manager` ``manager`` on ``device``, with ``prefix_token_id`` (:func:`document_start`)
    before each document where given; its results dict."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError
    from lm_eval import simple_evaluate

    try:
        return simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(model_dir),
                "dtype": "float32",
                # lmheads' own modeling file, where GPT-2 does not compute the model (lmheads.hf_remote)
                "trust_remote_code": (model_dir / "modeling_lmheads.py").is_file(),
                **({"prefix_token_id": prefix_token_id} if prefix_token_id is not None else {}),
            },
            tasks=tasks,
            batch_size=batch_size,
            limit=limit,
            device=device,
            task_manager=manager,
            verbosity="ERROR",
        )
    except (ConnectionError, DatasetNotFoundError, LocalEntryNotFoundError) as err:  # a task's data
        said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({said}): run where the Hub is "
            f"reachable or with the dataset in the HF cache; {LOCAL_TASK} scores a local file offline"
        ) from None


def document_start(tokenizer) -> int | None:
    """The token lm-eval conditions a document's first token on, where the exported tokenizer has no
    end-of-text token for it: for characters, a line break, which ends the line before any line of a text
    file (``None`` for the other tokenizers, whose ``<eos>`` or ``<bos>`` lm-eval finds)."""
    if not isinstance(tokenizer, CharTokenizer):
        return None
    if "\n" not in tokenizer.stoi:
        raise ConfigError(
            "lm-eval starts each document after an end-of-text token, and this run's characters hold none "
            "(nor a line break) to stand for it"
        )
    return tokenizer.stoi["\n"]


def metrics(results: dict) -> dict[str, float]:
    """``{"<task> <metric>": value}`` of lm-eval's results (standard errors and filters' names left out)."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name, _, _ = key.partition(",")  # "word_perplexity,none"
            if (
                name not in ("alias", "sample_len")
                and not name.endswith("_stderr")
                and isinstance(value, int | float)
            ):
                out[f"{task} {name}"] = float(value)
    return out


def unknown_note(tokenizer, text: Path) -> str | None:
    """A line when ``text`` holds what the run's vocabulary lacks, which the model reads and is scored on
    as ``<unk>`` (``fit`` says so of its own evaluation text; ``--text`` is other text)."""
    if tokenizer.unk_id is None:
        return None
    ids = tokenizer.encode(text.read_text(encoding="utf-8-sig"))
    share = ids.count(tokenizer.unk_id) / max(1, len(ids))
    if not share:
        return None
    return (
        f"harness: {share:.2%} of the tokens of {text} are outside the run's vocabulary; the model reads "
        "them as <unk>, and is scored on predicting <unk> there"
    )


def other_text(text: Path | None, given: bool, read: str | None) -> list[str]:
    """Why the text scored is not the run's test file as its fit read it (``read``, that file's SHA-256,
    where recorded), if it is not: ``--text`` (``given``) of other text, or the test file edited since.
    Text counts by its content, as it does for ``test``."""
    from lmheads.data.base import file_digest

    if text is None or (read is not None and file_digest(text) == read):
        return []
    if given:
        return [f"text={text}"]
    return (
        [] if read is None else [f"data.test_file: {str(text)!r} holds other text than when the run read it"]
    )


def main(argv: list[str]) -> None:
    """``python -m lmheads harness CHECKPOINT [--tasks T ...] [--text FILE] [--out DIR]``."""
    from lmheads.files import write_json
    from lmheads.hf import export_hf, from_checkpoint
    from lmheads.perf import device_arg
    from lmheads.run.claim import RunFolder
    from lmheads.run.layout import checkpoint_file, free_name, run_of_checkpoint
    from lmheads.run.records import filed_line, record_evaluation
    from lmheads.run.resume import data_sources

    parser = argparse.ArgumentParser(
        prog="python -m lmheads harness",
        description="Score a checkpoint with lm-evaluation-harness (pip install -e '.[eval]') and file the "
        "results in its run: <run>/harness/<checkpoint name>/results.json.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its checkpoints/last.ckpt)")
    parser.add_argument(
        "--tasks", nargs="+", default=[LOCAL_TASK], help=f"lm-eval tasks (default {LOCAL_TASK})"
    )
    parser.add_argument(
        "--text", type=Path, help=f"the text {LOCAL_TASK} scores (default: the run's test_file)"
    )
    parser.add_argument("--out", type=Path, help="where to file the results for a checkpoint outside a run")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", help="where the model runs (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    args = parser.parse_args(argv)
    require("python -m lmheads harness", "eval", "lm_eval", "transformers", "accelerate")
    ckpt = checkpoint_file(args.checkpoint)
    run = run_of_checkpoint(ckpt) if ckpt.is_file() else None
    if run is None and args.out is None:
        raise ConfigError(f"{ckpt} is not a checkpoint of a run: give --out for the results")
    if args.out is not None and args.out.exists():
        raise ConfigError(f"{args.out} exists; give a new folder for the results")
    if args.out is not None and (why := file_in_the_way(args.out)):
        raise ConfigError(f"--out {why}; give another --out")
    if args.text is not None and LOCAL_TASK not in args.tasks:  # it would be recorded as scored
        raise ConfigError(f"--text is the text of task {LOCAL_TASK}: add it to --tasks, or remove --text")
    if args.text is not None and not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file")
    if args.text is not None:
        from lmheads.data.sources import check_utf8

        check_utf8(args.text, "--text")
    for option, value in (("--batch_size", args.batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: give a positive number")
    if args.device is not None:
        try:
            device_arg(args.device)
        except argparse.ArgumentTypeError as err:  # torch's traceback, after the model was exported
            raise ConfigError(f"--device {args.device}: {err}") from None
    model, tokenizer, checkpoint = from_checkpoint(ckpt)
    if tokenizer is None:
        raise ConfigError("lm-eval scores text, and this model's data has none (the synthetic language)")
    test_file = (checkpoint.get("datamodule_hyper_parameters") or {}).get("test_file")
    text = args.text or (Path(test_file) if test_file and LOCAL_TASK in args.tasks else None)
    start = document_start(tokenizer)
    if LOCAL_TASK in args.tasks and text is None:
        raise ConfigError(
            f"task {LOCAL_TASK} scores a text file, and this run's data has no test_file: give --text FILE "
            "(held-out text), or other --tasks"
        )
    if args.text is not None and (note := unknown_note(tokenizer, args.text)):
        print(note)
    folder = args.out or run / free_name(run, f"{HARNESS}/{ckpt.stem}")
    with task_manager(args.tasks, text) as manager:  # an unknown task before anything is written
        claim = RunFolder(folder.resolve())
        claim.claim()
        try:
            with tempfile.TemporaryDirectory(prefix="lmheads-hf-") as tmp:
                for line in export_hf(model, Path(tmp) / "model", tokenizer):
                    print(line)
                device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                results = evaluate(
                    Path(tmp) / "model", args.tasks, manager, args.batch_size, args.limit, device, start
                )
            found = metrics(results)
            record = {"tasks": args.tasks, "text": str(text) if text else None, "limit": args.limit,
                      "device": device, "metrics": found, "lm_eval": results.get("versions", {})}  # fmt: skip
            write_json(folder / "results.json", record)
            step = int(checkpoint.get("global_step", 0))
            other = other_text(text, args.text is not None, data_sources(checkpoint).get("test_file"))
            if args.limit is not None:  # part of the data: not the run's score in compare.py's table
                other.append(f"--limit {args.limit}: the first documents of each task")
            record_evaluation(folder, ckpt, step, other)
        except BaseException:
            claim.release()
            raise
        finally:
            claim.ended()
    width = max(len(k) for k in found) if found else 0
    for key, value in found.items():
        print(f"{key:<{width}}  {value:.4f}" if math.isfinite(value) else f"{key:<{width}}  {value}")
    print(filed_line("harness", folder, other))
