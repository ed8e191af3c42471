"""The command line: every shipped config, a fit per head, errors, TensorBoard output, DDP, bf16."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmheads.cli import main
from lmheads.errors import ConfigError
from lmheads.heads import registered_heads
from lmheads.heads.names import expand_head_names
from lmheads.metrics import HP_METRICS
from lmheads.module import LMHeadModule
from lmheads.reporting import flat_hparams, parameter_counts

from .helpers import QUICKSTART, ROOT, fit, only_run, quick_args, run_lmheads, scalars

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
BUILTIN = ["tied", "untied", "tied_bias", "projected_tied", "lowrank_tied", "untie_during_training"]


def _config_args(config: str, shared: Path | None, tmp_path: Path) -> list[str]:
    """Arguments that make a config instantiable here: partial configs sit on the quickstart,
    local-data configs point at the reference corpora, hub configs at a local dataset directory, GPU
    trainers run on the CPU."""
    args = [
        "--config", QUICKSTART, "--config", str(ROOT / config), "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    uses_files = config.startswith("configs/data/") or config.startswith("configs/experiments/")
    if uses_files and "synthetic" not in config:
        if "hub" in config:
            local = tmp_path / "hub_copy"
            local.mkdir()
            (local / "train.jsonl").write_text(
                "\n".join(json.dumps({"text": f"w{i % 7} w{i % 3}\n"}) for i in range(400))
            )
            args += [f"--data.init_args.dataset_name={local}", "--data.init_args.dataset_config=null"]
        elif shared is None:
            pytest.skip("reference corpora not available")
        elif "wikitext" in config:
            for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
                args.append(f"--data.init_args.{split}_file={shared / 'wikitext-2' / f'{name}.txt'}")
        else:
            args.append(f"--data.init_args.train_file={shared / 'tinyshakespeare' / 'input.txt'}")
    if config.startswith("configs/trainer/") and not torch.cuda.is_available():
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
        if config.endswith("fsdp2.yaml"):
            args.append("--trainer.strategy.init_args.data_parallel_size=1")
    return args


def _gpu_only_strategy(config: str, capsys) -> None:
    """FSDP needs CUDA to build a Trainer: without one, parse the config and build its strategy."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from lmheads.sharding import check_strategy

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", QUICKSTART, "--config", str(ROOT / config), "--print_config"])
    assert exc.value.code == 0
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    built = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
    check_strategy(built)  # the shipped policy keeps the tie in one unit


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses_and_instantiates(config, tmp_path, capsys):
    if config.endswith("fsdp.yaml") and not torch.cuda.is_available():
        _gpu_only_strategy(config, capsys)
        return
    shared = ROOT.parent / "shared" / "data"
    shared = shared if (shared / "wikitext-2" / "train.txt").is_file() else None
    cli = main(_config_args(config, shared, tmp_path), run=False)
    assert isinstance(cli.model, LMHeadModule)
    assert cli.model.backbone.vocab_size == cli.datamodule.vocab_size
    assert cli.datamodule.block_size == cli.model.cfg.block_size


@pytest.mark.parametrize("name", BUILTIN)
def test_fit_each_head(name, tmp_path):
    cli = fit(tmp_path, f"--model.head={name}")
    run = only_run(tmp_path)
    assert run.name.startswith(f"{name}-seed0-")
    logged = scalars(run)
    for tag in ("train/loss", "val/loss", "val/ppl", "val/excess_loss", "perf/tokens_per_sec", *HP_METRICS):
        assert (tag in logged) == (tag != "hp/val_bpb"), tag  # no bits per byte without text
    counts = parameter_counts(cli.model)
    assert logged["params/total"] == [(0, counts["total"])]
    assert logged["params/head_own"] == [(0, counts["head_own"])]
    # the HParams tab: one session with the head and the parameter counts
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    (step, val_loss), optimum = logged["val/loss"][-1], logged["val/optimal_loss"][-1][1]
    assert step == 5 and math.isfinite(val_loss)
    assert val_loss > optimum  # no model beats the generating HMM
    assert math.isclose(logged["val/excess_loss"][-1][1], val_loss - optimum, rel_tol=1e-5)
    # the HParams columns hold the values (they went to hp/val/excess_loss, and the column stayed NaN)
    for column, tag in (("hp/val_loss", "val/loss"), ("hp/val_excess_loss", "val/excess_loss")):
        assert logged[column][-1] == logged[tag][-1], column
    assert not [tag for tag in logged if tag.startswith("hp/") and tag not in HP_METRICS]
    assert math.isclose(logged["val/ppl"][-1][1], math.exp(val_loss), rel_tol=1e-5)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert type(cli.model.head) is registered_heads()[name]


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    quickstart = ["--model.backbone.n_layer=2", "--model.backbone.d_model=128"]  # its own size
    cli = fit(tmp_path, *quickstart, "--data.init_args.train_tokens=262144", steps=80, every=40)
    logged = scalars(only_run(tmp_path))
    first, last = logged["val/loss"][0][1], logged["val/loss"][-1][1]
    optimum = logged["val/optimal_loss"][-1][1]
    assert last < first - 0.1 and first < math.log(1024)  # falling from the uniform 6.93
    assert optimum < last < cli.datamodule.unigram_entropy()  # uses context, cannot beat the HMM


def test_a_limited_validation_is_compared_with_the_optimum_of_the_tokens_it_scored(tmp_path):
    """``limit_val_batches`` scores the validation split's first blocks; their optimum differs from the
    whole split's, and the excess loss is measured against theirs."""
    limited = main(["validate", *quick_args(tmp_path), "--trainer.logger=false",
                    "--data.init_args.val_tokens=65536", "--trainer.limit_val_batches=2"])  # fmt: skip
    data, logged = limited.datamodule, limited.trainer.callback_metrics
    first = data.splits["validation"].blocks[: 2 * data.batch_size]  # 2 batches of 32 blocks
    expected = data.language.nll(first).mean()
    assert math.isclose(logged["val/optimal_loss"].item(), expected, rel_tol=1e-6)
    whole = data.optimal_loss("validation")
    assert abs(whole - expected) > 1e-3  # the bias a whole-split optimum would have put in the excess
    excess = logged["val/loss"].item() - expected
    assert math.isclose(logged["val/excess_loss"].item(), excess, rel_tol=1e-5, abs_tol=1e-6)


def test_bits_per_byte_only_for_a_whole_split(tmp_path):
    """Bits per byte divides by the bytes of the text scored: the split's bytes per token for the whole
    split; for its first batches alone (whose words here are longer than the rest's) none is logged."""
    text = tmp_path / "t.txt"
    lines = [" ".join(["extraordinarily", "longwinded"] * 4)] * 200 + [" ".join(["a", "b", "c"] * 4)] * 200
    text.write_text("\n".join(lines) + "\n")
    data = ["--data=lmheads.data.TextDataModule", "--data.tokenizer=word", f"--data.train_file={text}",
            f"--data.validation_file={text}", f"--data.cache_dir={tmp_path}", "--data.batch_size=2",
            "--model.backbone.block_size=16", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    whole = main(["validate", "--config", QUICKSTART, *data])
    logged = whole.trainer.callback_metrics
    per_token = whole.datamodule.bytes_per_token["validation"]
    assert math.isclose(
        logged["val/bpb"].item(), logged["val/loss"].item() / math.log(2) / per_token, rel_tol=1e-5
    )
    assert logged["hp/val_bpb"] == logged["val/bpb"]  # the HParams column
    first = main(["validate", "--config", QUICKSTART, *data, "--trainer.limit_val_batches=2"])
    logged = first.trainer.callback_metrics
    assert "val/bpb" not in logged and "hp/val_bpb" not in logged


def test_hparams_have_the_same_keys_for_every_head(tmp_path):
    keys = []
    for name in BUILTIN:
        cli = main([*quick_args(tmp_path), f"--model.head={name}"], run=False)
        cli.model.trainer = cli.trainer
        cli.trainer.datamodule = cli.datamodule
        flat = flat_hparams(cli.model, cli.trainer)
        keys.append({k: type(v) for k, v in flat.items()})
        assert flat["head"] == name
        assert flat["params/total"] == parameter_counts(cli.model)["total"]
    assert all(k == keys[0] for k in keys)
    # the optimizer's and schedule's settings are columns too, so runs that differ in them show it
    cli = main([*quick_args(tmp_path), "--model.betas=[0.9,0.99]", "--model.min_lr_ratio=0.05"], run=False)
    cli.model.trainer = cli.trainer
    cli.trainer.datamodule = cli.datamodule
    flat = flat_hparams(cli.model, cli.trainer)
    assert (flat["betas"], flat["min_lr_ratio"]) == ("0.9, 0.99", 0.05)


def test_checkpoint_reload_keeps_ties_and_outputs(tmp_path):
    cli = fit(tmp_path, "--model.head=tied_bias", steps=3, every=3)
    ckpt = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    loaded = LMHeadModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(loaded.head).__name__ == "TiedBiasHead"
    form = loaded.head.project(torch.zeros(1, loaded.cfg.d_model), loaded.backbone.wte)
    assert form.weight is loaded.backbone.wte.weight  # still tied after reload
    idx = torch.randint(0, loaded.backbone.vocab_size, (2, 16))
    cli.model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(idx), cli.model.cpu()(idx))
    assert sum(p.numel() for p in loaded.parameters()) == parameter_counts(cli.model)["total"]


def test_python_api_checkpoint_round_trip(tmp_path):
    """Outside the CLI a checkpoint stores the head as class_path/init_args and rebuilds it."""
    import lightning as L

    from lmheads.backbone import BackboneConfig
    from lmheads.data import SyntheticDataModule
    from lmheads.heads import UntiedHead

    dm = SyntheticDataModule(vocab_size=64, n_states=4, train_tokens=4096, val_tokens=512, block_size=16)
    model = LMHeadModule(
        head=UntiedHead(bias=True),
        backbone=BackboneConfig(n_layer=1, d_model=32, block_size=16),
        vocab_size=64,
    )
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = LMHeadModule.load_from_checkpoint(path, weights_only=True)  # plain types only
    assert loaded.head.options() == model.head.options() and loaded.head.options()["bias"] is True
    torch.testing.assert_close(loaded.head.weight, model.head.weight)


def test_validate_and_test_subcommands(tmp_path, recwarn):
    fit(tmp_path, steps=3, every=3)
    ckpt = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    for command in ("validate", "test"):
        cli = main([command, *quick_args(tmp_path), f"--ckpt_path={ckpt}", "--trainer.logger=false"])
        prefix = "val" if command == "validate" else "test"
        assert math.isfinite(cli.trainer.callback_metrics[f"{prefix}/loss"].item())
        # an evaluation saves no checkpoint: where the checkpoint callback would save them is moot
        assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_print_config_and_short_head_names(tmp_path, capsys):
    def printed(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", QUICKSTART, *args, "--print_config"])
        assert exc.value.code == 0
        return capsys.readouterr().out

    out = printed("--model.head=untied", "--model.head.bias=true")
    assert "class_path: lmheads.heads.untied.UntiedHead" in out and "bias: true" in out
    # in a config file too, as the head itself or as its class_path
    one_line, in_full = tmp_path / "one_line.yaml", tmp_path / "in_full.yaml"
    one_line.write_text("model:\n  head: untied\n")
    in_full.write_text("model:\n  head:\n    class_path: tied_bias\n    init_args:\n      z_loss: 0.5\n")
    assert "class_path: lmheads.heads.untied.UntiedHead" in printed("--config", str(one_line))
    out = printed("--config", str(in_full))
    assert "class_path: lmheads.heads.tied.TiedBiasHead" in out and "z_loss: 0.5" in out
    one_line.write_text("model:\n  head: untide\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", QUICKSTART, "--config", str(one_line), "--print_config"])
    assert exc.value.code == 2
    assert "error: unknown head 'untide'; registered heads: lowrank_tied" in capsys.readouterr().err
    assert expand_head_names(["--model.head", "tied_bias"]) == [
        "--model.head",
        "lmheads.heads.tied.TiedBiasHead",
    ]
    # one head, one recorded name, however it is given (a run's config.yaml is compared as it is)
    for given in ("UntiedHead", "untied", "lmheads.heads.UntiedHead", "lmheads.heads.untied.UntiedHead"):
        assert expand_head_names([f"--model.head={given}"]) == [
            "--model.head=lmheads.heads.untied.UntiedHead"
        ]
    in_full.write_text("model:\n  head:\n    class_path: lmheads.heads.UntiedHead\n")
    assert "class_path: lmheads.heads.untied.UntiedHead" in printed("--config", str(in_full))
    assert "class_path: lmheads.heads.tied.TiedHead" in printed()  # the default, and quickstart's TiedHead
    with pytest.raises(ConfigError, match="registered heads"):
        expand_head_names(["--model.head=tide"])


SHORT_TEXT = ["--data=lmheads.data.TextDataModule", "--data.train_file=t.txt"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.head=tide"], "error: unknown head 'tide'; registered heads: lowrank_tied, mos, projected"),
        (["--model.loss_backend=fused"], "invalid value 'fused' for --model.loss_backend: expected one of"),
        (["--model.loss_backend=liger"], "error: loss backend 'liger' runs on CUDA GPUs only"),
        (["--trainer.accelerator=gpu"], "error: trainer.accelerator asks for a GPU and torch sees none"),
        (
            ["--trainer.max_stpes=3"],
            "error: unknown option --trainer.max_stpes; did you mean --trainer.max_steps",
        ),
        (
            ["--trainer.max_step=3"],
            "error: unknown option --trainer.max_step; did you mean --trainer.max_steps",
        ),
        (
            ["--config", "typo.yaml"],  # a key of a config file: its section named, and the file
            "error: unknown option --model.backbone.n_layers (in typo.yaml); did you mean "
            "--model.backbone.n_layer, --model.backbone.unique_layers?",
        ),
        (["--model.fooo=1"], "error: unknown option --model.fooo; see --help for the options"),
        (["--model.lr=abc"], "error: invalid value 'abc' for --model.lr: expected PositiveFloat (v>0)"),
        (
            ["--model.loss_chunk_size=0"],
            "error: invalid value '0' for --model.loss_chunk_size: expected PositiveInt (v>0) or null",
        ),
        (
            ["--model.min_lr_ratio=2"],
            "error: invalid value '2' for --model.min_lr_ratio: expected ClosedUnitInterval (v>=0 and v<=1)",
        ),
        (["--config", "missing.yaml"], "error: invalid value for --config: File does not exist:"),
        (
            ["--model.head.bias=true"],
            "error: TiedHead has no option 'bias' (--model.head.bias); --model.head.help",
        ),
        (
            ["--model.head=untied", "--model.head.bias=maybe"],
            "error: invalid value 'maybe' for --model.head.bias: expected bool",
        ),
        (["--model.backbone.d_model=130"], "error: model.backbone.d_model=130 is not divisible by n_head=4"),
        (["--model.backbone.n_layer=0"], "error: model.backbone.n_layer must be positive"),
        (
            ["--data=lmheads.data.TextDataModule", "--data.train_file=missing.txt"],
            "error: data.train_file 'missing.txt' does not exist (a relative path is read from the current "
            "folder, ",
        ),
        (["--model.backbone.block_size=100000", *SHORT_TEXT], "fewer than block_size + 1"),
        (
            ["--model.backbone.block_size=0"],
            "error: data.block_size (the CLI's model.backbone.block_size) must be positive, got 0",
        ),
        (
            ["--data.block_size=16", "--print_config"],  # refused before a config without it is printed
            "error: data.block_size is set from model.backbone.block_size (the model's context length): give",
        ),
        (
            ['--data={"class_path": "SyntheticDataModule", "init_args": {"block_size": 16}}'],
            "error: data.block_size is set from model.backbone.block_size",
        ),
        (
            ["--config", "block.yaml"],  # as the parser reads it: into init_args
            "error: data.block_size is set from model.backbone.block_size",
        ),
        (
            [*SHORT_TEXT, "--data.min_count=2"],
            "error: data.min_count=2 is read by data.tokenizer=word only, and this run's tokenizer is char: "
            "remove data.min_count (or set it to 1), or set data.tokenizer=word",
        ),
        (
            ["--data=lmheads.data.TextDataModule", "--data.train_file=folder"],
            "error: data.train_file 'folder' is a folder; give the text file in it",
        ),
        (
            ["--data=lmheads.data.TextDataModule", "--data.train_file=nul.txt"],
            "error: data.train_file 'nul.txt' holds a NUL byte (byte 12): it is a binary file",
        ),
        (["--trainer.max_epochs=0"], "error: trainer.max_epochs=0 trains nothing"),  # with max_steps set
        (["--seed_everything=-5"], "error: seed_everything=-5 is not a seed numpy takes: give one from 0 to"),
        (
            ["--trainer.accumulate_grad_batches=0"],
            "error: trainer.accumulate_grad_batches=0: give a number of",
        ),
        (
            ["--trainer.log_every_n_steps=0"],
            "error: trainer.log_every_n_steps=0: give a number of at least 1",
        ),
        (["--trainer.limit_train_batches=0"], "error: trainer.limit_train_batches=0 trains nothing"),
        (["--trainer.accelerator=tpu"], "error: Requirement 'torch_xla"),
        (
            ["--trainer.val_check_interval=0"],
            "error: trainer.val_check_interval=0: give a number of training",
        ),
        (
            ["--trainer.check_val_every_n_epoch=0"],
            "error: trainer.check_val_every_n_epoch=0: give a number of",
        ),
        (["--model.betas=[0.9,1.5]"], "error: model.betas=(0.9, 1.5): each must be in [0, 1)"),
        (
            ["--trainer.precision=16-mixed"],
            "error: trainer.precision=16-mixed on the CPU: Lightning would run",
        ),
        (["--model.compile=bogus"], "error: model.compile='bogus' is not a torch.compile backend: give true"),
        (
            ["--model.backbone.positions=rope", "--model.backbone.rope_base=0"],
            "error: model.backbone.rope_base must be positive and finite, got 0.0",
        ),
        (
            ["--trainer.gradient_clip_val=-1"],
            "error: trainer.gradient_clip_val=-1 would reverse every gradient",
        ),
        (
            ["--trainer.logger+=CSVLogger"],
            "error: CSVLogger in --trainer.logger needs save_dir: give it in the class's init_args",
        ),
        (["--trainer.accumulate_grad_batches=2"], "error: val_check_interval=3 counts training batches, and"),
        (
            [
                "--trainer.accumulate_grad_batches=2",
                "--trainer.check_val_every_n_epoch=null",
                "--trainer.val_check_interval=4",
                "--data.init_args.train_tokens=10240",
            ],  # 5 batches an epoch
            "error: validation every 4 training batches (across epochs) falls between the batches of an",
        ),
        (
            ["--trainer.val_check_interval=1000"],
            "`val_check_interval` (1000) must be less than or equal to the number of the training batches",
        ),
        (["--ckpt_path=folder"], "checkpoint 'folder' is a folder; give a checkpoint file in --ckpt_path"),
        (
            ["--trainer.logger.init_args.save_dir=t.txt/runs"],
            "/t.txt is a file; give another trainer.logger.init_args.save_dir (or default_root_dir)",
        ),
        *(  # the run would be the experiment's folder itself, the folder above it, or inside another run
            (
                [f"--trainer.logger.init_args.version={v}"],
                f"error: --trainer.logger.init_args.version='{v}' is not",
            )
            for v in ("", "..", "a/b")
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(extra, message, tmp_path):
    if "accelerator=gpu" in extra[0] and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    (tmp_path / "t.txt").write_text("just a few words\n" * 20)  # for SHORT_TEXT
    (tmp_path / "folder").mkdir()
    (tmp_path / "nul.txt").write_bytes(b"a few words\n" + bytes(3000))
    (tmp_path / "block.yaml").write_text("data:\n  init_args:\n    block_size: 16\n")
    (tmp_path / "typo.yaml").write_text("model:\n  backbone:\n    n_layers: 2\n")
    _assert_one_error_line(run_lmheads("fit", *quick_args(tmp_path), *extra, cwd=tmp_path), message)
    assert not (tmp_path / "quickstart").exists()  # nothing created by a failed start


@pytest.mark.parametrize(
    ("command", "missing", "extra"),
    [
        (["export", "run", "out"], "transformers", "hf"),
        (["harness", "run"], "lm_eval", "eval"),
        (["fit", "--model.init_from=gpt2"], "transformers", "hf"),
        (["fit", "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml")], "wandb", "wandb"),
        (["fit", "--trainer.logger=MLFlowLogger"], "mlflow", None),  # no extra of lmheads'
        (["fit", "--trainer.logger=MLFlowLogger"], "sqlalchemy", None),  # its store in the run: SQLite
    ],
)
def test_a_missing_extra_is_one_line_naming_it(command, missing, extra, tmp_path, monkeypatch, capsys):
    """Without the optional package a command needs: the extra that installs it, before writing anything."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    if command[0] == "fit":
        command = ["fit", *quick_args(tmp_path), *command[1:]]
    with pytest.raises(SystemExit) as exc:
        main(command)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("error:") == 1 and "Traceback" not in err
    install = f'pip install -e ".[{extra}]"' if extra else f"pip install {missing}"
    assert f"needs {missing}, not installed: {install}" in err
    assert list(tmp_path.iterdir()) == []


def _assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


def test_a_callback_refusing_its_setting_is_one_line(tmp_path):
    """EarlyStopping monitoring a metric no run logs raises at the first validation: Lightning's own
    message, with the metrics to choose from, in one line instead of a traceback."""
    stop = ["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/los"]
    result = run_lmheads("fit", *quick_args(tmp_path), *stop, cwd=tmp_path)
    _assert_one_error_line(result, "error: Early stopping conditioned on metric `val/los` which is not")
    assert "`val/loss`" in result.stderr and result.stderr.rstrip().endswith("(a callback's setting)")


def test_no_command_names_the_commands(tmp_path):
    commands = "python -m lmheads fit, validate, test, predict, heads, export or harness (see --help)"
    result = run_lmheads("--config", QUICKSTART, cwd=tmp_path)
    _assert_one_error_line(result, f"error: no command given: {commands}")
    for given, hint in [("hrness", "did you mean harness? "), ("xyz", "")]:  # lmheads' own commands too
        _assert_one_error_line(
            run_lmheads(given, cwd=tmp_path), f"error: unknown command '{given}'; {hint}{commands}"
        )


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   oops: [\n")
    result = run_lmheads("fit", "--config", QUICKSTART, "--config", str(bad), cwd=tmp_path)
    _assert_one_error_line(result, f"error: {bad}, line 3, column 8: mapping values are not allowed here")


def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    text = tmp_path / "latin1.txt"
    good = "caf\u00e9 au lait\n".encode() * 50
    text.write_bytes(good + "na\u00efve\n".encode("latin-1"))  # the first bad byte follows "na"
    args = ["--data=lmheads.data.TextDataModule", f"--data.train_file={text}"]
    result = run_lmheads("fit", *quick_args(tmp_path), *args, cwd=tmp_path)
    _assert_one_error_line(result, f"is not UTF-8 text (byte {len(good) + 2}:")


def test_output_to_a_file_reads_as_plain_lines(tmp_path):
    """Written to a file, not a terminal: progress as plain lines (no carriage returns or cursor escapes),
    none of Lightning's routine lines, and for the synthetic language no bits per byte in the HParams
    row, where it is undefined."""
    args = [*quick_args(tmp_path, steps=6, every=3), "--trainer.enable_progress_bar=true"]
    result = run_lmheads("fit", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "\r" not in said and "\x1b[" not in said
    for routine in ("Seed set to", "GPU available", "TPU available"):
        assert routine not in said
    lines = said.splitlines()
    assert any(line.startswith("step 3/6 epoch 0 ") and "train/loss " in line for line in lines), said
    assert any(line.startswith("step 6 validation val/loss ") for line in lines), said
    logged = scalars(only_run(tmp_path))
    assert "hp/val_excess_loss" in logged and "hp/val_bpb" not in logged


def test_progress_lines_show_each_optimizer_step_once_when_gradients_accumulate(tmp_path, capsys):
    """With two batches a step, the batch that only accumulates leaves the step count as it was: its line
    must not be printed a second time."""
    accumulating = ["--trainer.enable_progress_bar=true", "--trainer.accumulate_grad_batches=2"]
    fit(tmp_path, *accumulating, steps=4, every=8)
    lines = [line.split(" epoch ")[0] for line in capsys.readouterr().out.splitlines() if " steps/s" in line]
    assert lines == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]


def test_a_mistyped_key_of_a_config_file_given_before_the_command_names_the_file(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("fit:\n  trainer:\n    precison: bf16-mixed\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "typo.yaml"), "fit", *quick_args(tmp_path)])
    assert exit_info.value.code == 2 and not (tmp_path / "quickstart").exists()
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: unknown option --trainer.precison (in {tmp_path / 'typo.yaml'}); "
        "did you mean --trainer.precision?"
    )


def test_help_lists_every_command_and_a_command_builds_its_own_parser_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0 and "{fit,validate,test,predict}" in capsys.readouterr().out
    cli = main(["validate", *quick_args(tmp_path), "--trainer.logger=false"])
    assert list(cli.subcommands()) == ["validate"] and "val/loss" in cli.trainer.callback_metrics


def test_help_of_a_class_names_the_command(tmp_path):
    result = run_lmheads("fit", "--model.head.help", "untied", cwd=tmp_path, new_python=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m lmheads "), result.stdout


def test_the_installed_lmheads_command_is_python_m_lmheads(tmp_path):
    """The ``lmheads`` command pip installs (``[project.scripts]``), run as its wrapper runs it:
    ``sys.exit(entry_point())``. A fit that ends well ends with status 0 and prints what ``python -m
    lmheads`` prints, not the CLI object; warnings are one line each there too."""
    wrapper = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "(script,) = entry_points(group='console_scripts', name='lmheads')\n"
        "sys.argv = ['lmheads', *sys.argv[1:]]\n"
        "sys.exit(script.load()())\n"
    )
    args = ["fit", *quick_args(tmp_path, steps=2, every=2)]
    command = subprocess.run(
        [sys.executable, "-c", wrapper, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert command.returncode == 0, command.stderr
    assert "LMHeadsCLI object" not in command.stderr and "  val/loss " in command.stdout
    assert all(line.startswith("warning: ") for line in command.stderr.splitlines() if "Warning" in line)


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """Importing Lightning takes seconds: Ctrl-C then ends ``python -m lmheads`` as it does later, with one
    ``interrupted:`` line and status 130, not a traceback of the import."""
    ctrl_c_on_import = (
        "import builtins, os, runpy, signal, sys\n"
        "real = builtins.__import__\n"
        "def ctrl_c(name, *args, **kwargs):\n"
        "    if name == 'lightning':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = ctrl_c\n"
        "sys.argv = ['-m', 'fit']\n"
        "runpy.run_module('lmheads', run_name='__main__', alter_sys=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", ctrl_c_on_import], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr == "interrupted: SIGINT outside training: nothing was saved\n"


def test_text_data_is_prepared_in_lines_where_the_output_is_not_a_terminal(tmp_path):
    """In a log file or a pipe, the datasets library's progress bars would be carriage returns (kilobytes of
    them for a large corpus): a line says what is tokenized instead, as training's progress is lines."""
    text = tmp_path / "train.txt"
    text.write_text("".join(f"line {i}: the {i % 7} cats sat on {i % 11} mats\n" for i in range(3000)))
    data = ["--data=lmheads.data.TextDataModule", f"--data.train_file={text}", f"--data.cache_dir={tmp_path}"]
    result = run_lmheads("fit", *quick_args(tmp_path, steps=2, every=2), *data, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout + result.stderr
    assert "data: tokenizing train (2,850 records), once for later runs" in result.stdout + result.stderr
    import datasets  # in a process that goes on (a notebook), the library's bars are as they were

    from lmheads.data import TextDataModule

    datasets.enable_progress_bars()
    TextDataModule(train_file=str(text), cache_dir=str(tmp_path / "again")).prepare_data()
    assert datasets.is_progress_bar_enabled()


def test_a_warning_is_one_plain_line(tmp_path):
    """A warning the command gives (a loss backend the head cannot use) is ``warning: <message>``, not the
    source file, line and code it was raised at."""
    args = ["--model.head=mos", "--model.loss_backend=chunked", "--trainer.fast_dev_run=true"]
    result = run_lmheads("fit", *quick_args(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "is not a linear form" in line]
    assert lines == [
        "warning: head 'mos' is not a linear form, so loss backend 'chunked' cannot serve it; it uses the "
        "full logits (naive) instead"
    ]
    assert "UserWarning" not in result.stderr and "head_loss(head, loss_backend" not in result.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process_validation(tmp_path):
    """Validation under DDP equals one process's: every block once, none twice, none left out, with an
    odd number of blocks (65 of 64 tokens: 33 on one rank, 32 on the other) and a short last batch."""
    data = ["--data.init_args.batch_size=24", "--data.init_args.val_tokens=4160"]
    result = run_lmheads(
        "fit", *quick_args(tmp_path), "--config", str(ROOT / "configs/trainer/ddp-cpu.yaml"), *data,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # two ranks really ran
    run = only_run(tmp_path)
    logged = scalars(run)
    cli = main([
        "validate", *quick_args(tmp_path), *data, "--trainer.logger=false",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ])  # fmt: skip
    for tag in ("val/loss", "val/excess_loss", "val_freq/loss_rest", "val_freq/token_share_top1pct"):
        assert math.isclose(cli.trainer.callback_metrics[tag].item(), logged[tag][-1][1], rel_tol=1e-5), tag
    # predict under DDP: both processes write into the one evaluation folder, each prompt exactly once
    sampling = ["--sampling.prompt_tokens=8", "--sampling.max_new_tokens=2"]
    ckpt = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    result = run_lmheads(
        "predict", *quick_args(tmp_path), "--config", str(ROOT / "configs/trainer/ddp-cpu.yaml"), *data,
        *sampling, ckpt, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    main(["predict", *quick_args(tmp_path), *data, *sampling, ckpt])
    written = {p.relative_to(run).as_posix() for p in run.rglob("samples-*.jsonl")}
    assert written == {"predict/last/samples-rank0.jsonl", "predict/last/samples-rank1.jsonl",
                       "predict/last-2/samples-rank0.jsonl"}  # fmt: skip

    def prompts(folder: str) -> list[str]:
        return sorted(json.loads(line)["prompt"] for p in (run / folder).glob("*.jsonl") for line in p.open())

    assert prompts("predict/last") == prompts("predict/last-2") and len(prompts("predict/last")) == 65


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_cpu(tmp_path, precision):
    """bf16-true casts the whole model with .to(dtype): the metrics' token-weighted sums stay float64."""
    from torchmetrics import Metric

    cli = fit(tmp_path, f"--trainer.precision={precision}", "--trainer.logger=false", steps=3, every=3)
    assert cli.trainer.precision == precision
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    states = [getattr(m, key) for m in cli.model.modules() if isinstance(m, Metric) for key in m._defaults]
    assert states and {state.dtype for state in states} == {torch.float64}


def test_predict_writes_decoded_samples(tmp_path, capsys):
    fit(tmp_path, steps=3, every=3)
    ckpt = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    main([
        "predict", *quick_args(tmp_path), f"--ckpt_path={ckpt}", "--trainer.logger=false",
        "--trainer.limit_predict_batches=1",  # one batch, as Lightning documents an int (not 100%)
        "--sampling.prompt_tokens=8", "--sampling.max_new_tokens=5", "--sampling.top_k=3",
    ])  # fmt: skip
    lines = (only_run(tmp_path) / "predict" / "last" / "samples-rank0.jsonl").read_text().splitlines()
    assert len(lines) == 32  # one batch of 32 prompts
    record = json.loads(lines[0])
    assert len(record["prompt"].split()) == 8 and len(record["completion"].split()) == 5
    # a prompt is the start of a block: one longer than the context (64 here) is refused, not cut to it
    with pytest.raises(SystemExit) as refused:
        main(["predict", *quick_args(tmp_path), f"--ckpt_path={ckpt}", "--sampling.prompt_tokens=65"])
    assert refused.value.code == 2
    assert "sampling.prompt_tokens=65 is longer than the model's context (model.backbone.block_size=64)" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in (only_run(tmp_path) / "predict").iterdir()) == ["last"]  # nothing new


def test_generate_greedy_and_top_k():
    from lmheads.backbone import BackboneConfig

    torch.manual_seed(0)
    model = LMHeadModule(
        vocab_size=50, backbone=BackboneConfig(n_layer=1, d_model=16, n_head=2, block_size=8)
    )
    prompt = torch.randint(0, 50, (2, 3))
    out = model.generate(prompt, 10, temperature=0)  # longer than block_size: the context is cropped
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt)
    assert torch.equal(out, model.generate(prompt, 10, temperature=0))  # greedy is deterministic
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 20, top_k=1, generator=g)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=0))  # top-1 sampling is greedy


def test_samples_in_tensorboard_text_tab(tmp_path):
    fit(tmp_path, "--sampling.validation_samples=2", "--sampling.max_new_tokens=4", steps=3, every=3)
    acc = EventAccumulator(str(only_run(tmp_path)))
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= set(tags)
    text = acc.Tensors("samples/0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "**prompt**" in text and "**continuation**" in text
