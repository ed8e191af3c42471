"""Measures of the tying question: CKA and neighbour overlap, the embedding's gradient by side, and the
input-gradient scale (lmheads.geometry, lmheads.diagnostics.EmbeddingGradientTap, backbone option)."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmheads.backbone import BackboneConfig
from lmheads.diagnostics import EmbeddingGradientTap
from lmheads.geometry import linear_cka, nearest_neighbours, neighbour_overlap
from lmheads.heads import head_class
from lmheads.module import LMHeadModule

from .helpers import fit, only_run, scalars, tool

V, D = 300, 16


def matrices(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)


def test_cka_is_one_for_the_same_geometry_and_near_zero_for_unrelated_matrices():
    x, y = matrices()
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, torch.cat([x, x], 1)) == pytest.approx(1.0)  # and to the width
    assert linear_cka(x, y) < 0.1  # independent: about D / V
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))


def test_neighbour_overlap_is_one_for_the_same_geometry_and_chance_for_unrelated_matrices():
    x, y = matrices()
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(neighbour_overlap(x, 2.0 * x @ rotation, k=10), torch.ones(V))
    assert float(neighbour_overlap(x, y, k=10).mean()) < 0.1  # chance: 10 / 299
    assert float(neighbour_overlap(x, x + 0.1 * y, k=10).mean()) > 0.6  # close geometry, most shared


def test_embeddings_tool_finds_each_matrix_neighbours_once(monkeypatch):
    """Every pair's overlap as neighbour_overlap gives it, from one neighbour search a matrix (each search
    sorts V x V similarities: 20 instead of 5 for the five matrices of four heads)."""
    embeddings = tool("embeddings")
    x, y = matrices()
    found = {"x": x, "y": y, "z": x + 0.1 * y}
    searched = []

    def counted(m, k):
        searched.append(m)
        return nearest_neighbours(m, k)

    monkeypatch.setattr(embeddings, "nearest_neighbours", counted)
    rows = embeddings.compare(found, None, k=10)
    assert len(searched) == 3
    for row, (a, b) in zip(rows, (("x", "y"), ("x", "z"), ("y", "z")), strict=True):
        assert row["pair"] == f"{a} ~ {b}"
        assert row["overlap"] == float(neighbour_overlap(found[a], found[b], k=10).mean())


def _model(scale: float = 1.0, head: str = "tied") -> LMHeadModule:
    torch.manual_seed(0)
    cfg = BackboneConfig(n_layer=1, n_head=2, d_model=D, block_size=8, input_grad_scale=scale)
    return LMHeadModule(head=head_class(head)(), backbone=cfg, vocab_size=V)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (4, 8), generator=g), torch.randint(0, V, (4, 8), generator=g)


def _side_gradients(model: LMHeadModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: E's gradient from the input lookup and from the output side, in two passes, each
    with the other use of E detached."""
    idx, targets = _batch()
    weight = model.backbone.wte.weight
    grads = []
    for detach_input in (False, True):
        model.zero_grad()
        original = model.backbone.wte.forward
        if detach_input:
            model.backbone.wte.forward = lambda i: torch.nn.functional.embedding(i, weight.detach())
        output_side = None if detach_input else _Detached(weight)  # what the head reads as E
        _head_loss(model, idx, targets, output_side).loss.backward()
        model.backbone.wte.forward = original
        grads.append(weight.grad.clone())
    return grads[0], grads[1]  # input side, output side


def _head_loss(model: LMHeadModule, idx, targets, output_side=None):
    """The module's training loss with the head reading ``output_side`` as E (default: E itself)."""
    h = model.backbone(idx).flatten(0, 1)
    embedding = model.backbone.wte if output_side is None else output_side
    return model.head_loss.train_loss(model.head, h, embedding, targets.flatten())


class _Detached:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()


@pytest.mark.parametrize("head", ["tied", "tied_bias", "projected_tied", "lowrank_tied"])
def test_gradient_share_matches_two_separate_passes(head):
    model = _model(head=head)
    if head == "projected_tied":
        model = LMHeadModule(
            head=head_class(head)(), backbone=BackboneConfig(n_layer=1, n_head=2, d_model=D, d_embed=8,
                                                             block_size=8), vocab_size=V)  # fmt: skip
    g_in, g_out = _side_gradients(model)
    model.zero_grad()
    tap = EmbeddingGradientTap(model.backbone.wte)
    idx, targets = _batch()
    with tap.input_side():  # as the GradientShare callback taps a step
        _head_loss(model, idx, targets, tap.output_side).loss.backward()
    torch.testing.assert_close(tap.input_grad, g_in)
    torch.testing.assert_close(tap.output_grad, g_out)
    torch.testing.assert_close(model.backbone.wte.weight.grad, g_in + g_out)  # the tap changes nothing
    expected = g_out.square().sum() / (g_in.square().sum() + g_out.square().sum())
    assert float(tap.output_share()) == pytest.approx(float(expected), rel=1e-5)


def test_input_grad_scale_zero_leaves_only_the_output_side_and_one_changes_nothing():
    idx, targets = _batch()
    reference = _model()
    reference.train_loss(idx, targets).loss.backward()
    one = _model(1.0)
    one.train_loss(idx, targets).loss.backward()
    assert torch.equal(one.backbone.wte.weight.grad, reference.backbone.wte.weight.grad)  # bit for bit
    _, g_out = _side_gradients(_model())
    zero = _model(0.0)
    loss = zero.train_loss(idx, targets).loss
    assert torch.equal(loss, reference.train_loss(idx, targets).loss)  # forward unchanged
    loss.backward()
    torch.testing.assert_close(zero.backbone.wte.weight.grad, g_out)
    half_in, _ = _side_gradients(_model(0.5))
    full_in, _ = _side_gradients(_model())
    torch.testing.assert_close(half_in, 0.5 * full_in)


def test_training_logs_the_gradient_share_for_a_tied_head_only(tmp_path):
    fit(tmp_path, steps=4, every=2)
    share = [v for _, v in scalars(only_run(tmp_path))["diag/grad_share_output"]]
    assert len(share) == 4 and all(0.0 < v < 1.0 for v in share)  # log_every_n_steps=1
    untied = tmp_path / "untied"
    fit(untied, "--model.head=untied", steps=2, every=2)
    assert "diag/grad_share_output" not in scalars(only_run(untied))


def test_embeddings_tool_tells_datasets_apart_by_their_text():
    """A dataset given by name can hold other text, and so other tokens, under that name."""
    vocabulary = tool("embeddings").vocabulary

    def checkpoint(text_digest: str) -> dict:
        options = {
            "_class_path": "lmheads.data.TextDataModule",
            "dataset_name": "corpus",
            "tokenizer": "char",
        }
        return {
            "datamodule_hyper_parameters": options,
            "TextDataModule": {"sources": {"train_text": text_digest}},
        }

    assert vocabulary(checkpoint("a")) == vocabulary(checkpoint("a"))
    assert vocabulary(checkpoint("a")) != vocabulary(checkpoint("b"))


def test_embeddings_tool_compares_runs_and_refuses_other_vocabularies(tmp_path, capsys):
    fit(tmp_path, steps=2, every=2)
    fit(tmp_path, "--model.head=untied", steps=2, every=2)
    runs = sorted((tmp_path / "quickstart").iterdir())
    embeddings = tool("embeddings")
    assert embeddings.main([*map(str, runs), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tied-") or line.startswith("| untied-")]
    assert len(rows) == 3  # tied E, untied E, untied W: three pairs
    assert "top 1% types" in out and (tmp_path / "report" / "embeddings.png").is_file()
    assert "| – |" in out and "\n–: CKA of a bucket with fewer than twice as many tokens as dimensions" in out
    other = tmp_path / "other"
    fit(other, "--data.init_args.vocab_size=512", steps=1, every=1)
    assert embeddings.main([str(runs[0]), str(only_run(other))]) == 2
    assert "different vocabularies" in capsys.readouterr().err
    # a run given twice (as a folder and as its last.ckpt) is not a run like itself
    assert embeddings.main([str(runs[0]), str(runs[0] / "checkpoints" / "last.ckpt")]) == 2
    assert f"error: {runs[0] / 'checkpoints' / 'last.ckpt'} is given twice" in capsys.readouterr().err
    assert embeddings.main([str(runs[0]), str(tmp_path / "quickstart")]) == 2  # the runs' folder, not a run
    assert "holds no checkpoints/last.ckpt; give one of its checkpoint files" in capsys.readouterr().err
    for k, said in ((0, "of at least 1"), (1024, "a token has 1,023 other tokens")):
        assert embeddings.main([*map(str, runs), "--k", str(k)]) == 2
        assert f"error: --k {k}: " in (err := capsys.readouterr().err) and said in err
    # as many tokens, but of another language: row i is another token
    language = tmp_path / "language"
    fit(language, "--data.init_args.language_seed=7", "--data.init_args.train_tokens=32768", steps=1, every=1)
    assert embeddings.main([str(runs[0]), str(only_run(language))]) == 2
    assert "with different vocabularies (language_seed: 1234 and 7)" in capsys.readouterr().err
    # one run name in two experiments: both compared, told apart by their folders
    copy = tmp_path / "elsewhere" / runs[0].name
    shutil.copytree(runs[0], copy)
    assert embeddings.main([str(runs[0]), str(copy)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tied-")]
    assert f"~ elsewhere/{runs[0].name} (tied) E | 1.000 | 1.000 |" in row
