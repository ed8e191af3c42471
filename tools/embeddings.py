"""What the token matrices of trained heads have become: are they alike, and where?

    python tools/embeddings.py runs/synthetic/tied-seed0 runs/synthetic/untied-seed0 --out report/

Each argument is a run folder (its ``checkpoints/last.ckpt``) or a checkpoint file. From every
checkpoint it takes the input embedding E and, for a linear head, the effective output matrix W of
``logits = h' W^T + b`` when W is not E itself (untied: its own matrix; low-rank: E + A B^T). For every
pair of matrices it prints linear CKA (Kornblith et al. 2019) and the mean overlap of each token's
nearest neighbours by cosine, over all tokens and per training-frequency bucket (top 1% of types, the
next 9%, the rest: the buckets the run's validation metrics use), and with ``--out`` writes the table
and a heat-map. Press & Wolf (2017, sec. 4) found a tied matrix closer to an untied model's output
matrix than to its input embedding; this is the measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import combinations
from pathlib import Path

import pandas as pd
import torch
from report import check_outputs, command, markdown, publish, pyplot, save_figure

from lmheads.checkpointing import TOKEN_BUCKET_KEY, read_checkpoint
from lmheads.errors import ConfigError
from lmheads.geometry import linear_cka, nearest_neighbours, shared_neighbours
from lmheads.heads import LinearHead, head_name
from lmheads.metrics import FREQUENCY_BUCKET_LABELS, FREQUENCY_BUCKETS
from lmheads.module import module_from_checkpoint
from lmheads.run.layout import checkpoint_file
from lmheads.run.resume import data_sources

#: Data options that do not decide which token a row of the matrices stands for.
NOT_VOCABULARY = {"train_tokens", "val_tokens", "block_size", "batch_size", "num_workers", "num_proc"}
NOT_VOCABULARY |= {"cache_dir", "random_offsets", "validation_file", "test_file"}


def vocabulary(checkpoint: dict) -> dict:
    """What decides which token each row is: the data module and its options, the training text by its
    content (a copy elsewhere holds the same text; a dataset can hold other text under one name); not the
    sizes, loaders or evaluation files."""
    options = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    sources = data_sources(checkpoint)
    for key in ("train_file", "train_text"):  # a file's digest, or a dataset's text's
        if key in sources:
            options[key] = sources[key]
    return {k: v for k, v in options.items() if k not in NOT_VOCABULARY and k != "_instantiator"}


def load(path: Path) -> tuple[str, dict[str, torch.Tensor], torch.Tensor | None, dict]:
    """The checkpoint's name, its token matrices by label, the token buckets it was trained with, and
    what decides its vocabulary (:func:`vocabulary`)."""
    try:
        ckpt_path = checkpoint_file(path)
        checkpoint = read_checkpoint(str(ckpt_path), given_as="the run or checkpoint")
        model = module_from_checkpoint(str(ckpt_path), checkpoint)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    name = path.name if path.is_dir() else f"{path.parent.parent.name}/{path.stem}"
    embedding = model.backbone.wte
    matrices = {"E": embedding.weight.detach()}
    if isinstance(model.head, LinearHead):
        with torch.no_grad():
            probe = torch.zeros(1, model.head.d_model)
            weight = model.head.linear_form(probe, embedding).weight
        if weight is not embedding.weight:
            matrices["W"] = weight.detach()
    label = f"{name} ({head_name(model.head)})"
    return label, matrices, checkpoint.get(TOKEN_BUCKET_KEY), vocabulary(checkpoint)


def compare(matrices: dict[str, torch.Tensor], bucket: torch.Tensor | None, k: int) -> list[dict]:
    rows = []
    neighbours = {name: nearest_neighbours(m, k) for name, m in matrices.items()}  # once a matrix: (V, k)
    for (a, x), (b, y) in combinations(matrices.items(), 2):
        overlap = shared_neighbours(neighbours[a], neighbours[b])  # (V,)
        row = {"pair": f"{a} ~ {b}", "cka": linear_cka(x, y), "overlap": float(overlap.mean())}
        for i, name in enumerate(FREQUENCY_BUCKETS):
            if bucket is None:
                continue
            rows_in = bucket == i
            row[f"overlap_{name}"] = float(overlap[rows_in].mean())
            # CKA on fewer tokens than dimensions says little (it is near 1 for any matrices).
            enough = int(rows_in.sum()) > 2 * max(x.size(1), y.size(1))
            row[f"cka_{name}"] = linear_cka(x[rows_in], y[rows_in]) if enough else None
        rows.append(row)
    return rows


def table(rows: list[dict], k: int, bucketed: bool) -> str:
    header = ["pair", "CKA", f"{k}-NN overlap"]
    if bucketed:
        for name in FREQUENCY_BUCKETS:
            header += [f"CKA, {FREQUENCY_BUCKET_LABELS[name]}", f"overlap, {FREQUENCY_BUCKET_LABELS[name]}"]
    table = []
    for row in rows:
        cells = [row["pair"], f"{row['cka']:.3f}", f"{row['overlap']:.3f}"]
        if bucketed:
            for name in FREQUENCY_BUCKETS:
                cka = row[f"cka_{name}"]
                cells += ["–" if cka is None else f"{cka:.3f}", f"{row[f'overlap_{name}']:.3f}"]
        table.append(cells)
    text = markdown(pd.DataFrame(table, columns=header))
    if any(row.get(f"cka_{name}", 0) is None for row in rows for name in FREQUENCY_BUCKETS):
        text += "\n\n–: CKA of a bucket with fewer than twice as many tokens as dimensions (it says little)."
    return text


def heatmap(matrices: dict[str, torch.Tensor], rows: list[dict], k: int, out: Path) -> Path:
    plt = pyplot()

    names = list(matrices)
    n = len(names)
    values = {"CKA": torch.eye(n), f"{k}-NN overlap": torch.eye(n)}
    pairs = list(combinations(range(n), 2))
    for (i, j), row in zip(pairs, rows, strict=True):
        for key, field in zip(values, ("cka", "overlap"), strict=True):
            values[key][i, j] = values[key][j, i] = row[field]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * n, 0.9 * n + 2.5), dpi=120, layout="constrained")
    for column, (ax, (title, grid)) in enumerate(zip(axes, values.items(), strict=True)):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize="small")
        ax.set_yticks(range(n), names if column == 0 else [], fontsize="small")  # the names once, on the left
        for i in range(n):
            for j in range(n):
                colour = "white" if grid[i, j] < 0.6 else "black"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize="x-small", color=colour)
        ax.set_title(title)
    fig.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(fig, out / "embeddings.png", bbox_inches="tight")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or checkpoint files")
    parser.add_argument("--k", type=int, default=10, help="neighbours per token")
    parser.add_argument("--out", type=Path, help="folder for table.md and embeddings.png")
    args = parser.parse_args(argv)
    if problem := check_outputs(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.k < 1:
        print(f"error: --k {args.k}: give a number of neighbours of at least 1", file=sys.stderr)
        return 2
    checkpoints = [checkpoint_file(p).resolve() for p in args.paths]
    repeated = next((p for i, p in enumerate(args.paths) if checkpoints[i] in checkpoints[:i]), None)
    if repeated is not None:
        print(f"error: {repeated} is given twice (as its checkpoint); give each run once", file=sys.stderr)
        return 2
    matrices: dict[str, torch.Tensor] = {}
    bucket = None
    vocabularies: dict[str, dict] = {}
    for path in args.paths:
        label, found, buckets, vocab = load(path)
        if label in vocabularies:  # two runs of one name, from two experiments: the experiment's folder
            run = path.resolve() if path.is_dir() else path.resolve().parents[1]
            label = f"{run.parent.name}/{label}"
        if label in vocabularies:
            print(f"error: two runs have the name {label}; give other runs", file=sys.stderr)
            return 2
        vocabularies[label] = vocab
        for kind, matrix in found.items():
            matrices[f"{label} {kind}"] = matrix
        bucket = buckets if bucket is None else bucket
    (first, reference), *others = vocabularies.items()
    for label, vocab in others:
        differ = sorted(k for k in vocab.keys() | reference.keys() if vocab.get(k) != reference.get(k))
        if vocab and reference and differ:  # (checkpoints without their data's options: not compared)
            shown = "; ".join(f"{k}: {reference.get(k)!r} and {vocab.get(k)!r}" for k in differ)
            print(f"error: {first} and {label} were trained on data with different vocabularies ({shown}): "
                  "their rows are not the same tokens; compare runs on the same data",
                  file=sys.stderr)  # fmt: skip
            return 2
    sizes = {name: m.size(0) for name, m in matrices.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {v:,}" for name, v in sizes.items())
        print(f"error: the matrices have different vocabularies ({listed}); compare runs on the same data",
              file=sys.stderr)  # fmt: skip
        return 2
    if len(matrices) < 2:
        print("error: one matrix only; give two runs, or a run whose head has an output matrix of its own",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.k >= next(iter(sizes.values())):
        print(f"error: --k {args.k}: a token has {next(iter(sizes.values())) - 1:,} other tokens; give a "
              "smaller number of neighbours", file=sys.stderr)  # fmt: skip
        return 2
    rows = compare(matrices, bucket, args.k)
    text = table(rows, args.k, bucket is not None)
    publish(text, args.out, lambda out: [heatmap(matrices, rows, args.k, out)])
    return 0


if __name__ == "__main__":
    sys.path.insert(1, os.getcwd())  # where `python -m lmheads` finds a head of your own
    sys.exit(main())
