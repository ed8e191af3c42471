"""Figures 1 and 2 of docs/results.md: untied minus tied over training, for every setting whose per-seed
differences are committed, against epochs and against training tokens per vocabulary type.

Reads the ``differences_over_steps.md`` tables that ``buckets.py --over-steps`` wrote into
``docs/results/<study>/`` (one table per setting; a study of several vocabularies or widths has one per
setting), and WikiText-2's short budget from ``wikitext2_tying/against_tied.md``. Each point is the mean
of the seeds' differences with its 95% t-interval (:mod:`lmheads.stats`); the table gives each setting's
last validation, Holm-adjusted within that family.

    python tools/figures.py --out docs/results/figures --update docs/results.md --section figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from report import check_outputs, command, markdown, publish, pyplot, save_figure

from lmheads.stats import effect, family, policy_note
from lmheads.streams import pipe_safe_output

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

#: Each study's data: training tokens an epoch and vocabulary types (from its page under docs/studies/),
#: and a label. A table inside a study may name another vocabulary (``vocab_size=3,933``).
STUDIES = {
    "wikitext2_converged": ("WikiText-2 words, width 256, dropout 0.2 (GPU)", 2_088_576, 33_278),
    "shakespeare_words": ("Shakespeare words, width 128, 11 epochs", 220_736, 9_984),
    "shakespeare_words_long": ("Shakespeare words, width 128, 22 epochs", 220_736, 9_984),
    "shakespeare_words_dropout0": ("Shakespeare words, width 128, no dropout", 220_736, 9_984),
    "shakespeare_words_dropout03": ("Shakespeare words, width 128, dropout 0.3", 220_736, 9_984),
    "shakespeare_words_width256": ("Shakespeare words, width 256, 11 epochs", 220_736, 9_984),
    "shakespeare_words_vocab": ("Shakespeare words, 11 epochs", 220_736, None),
}
#: WikiText-2 at a fifth of an epoch (docs/studies/wikitext2_short.md), one point: the final validation.
SHORT_BUDGET = (
    "wikitext2_tying/against_tied.md",
    "WikiText-2 words, width 128, no dropout, 0.2 epochs",
    0.2,
    2_088_576,
    33_278,
)


def tables(path: Path) -> list[tuple[str, pd.DataFrame]]:
    """The markdown tables of a file, each with the line before it when that line names a setting."""
    lines, found = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("| step |"):
            continue
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip("|").split("|")])
        header = [c.strip() for c in line.strip("|").split("|")]
        label = lines[i - 1].rstrip(":") if i and lines[i - 1].endswith(":") else ""
        found.append((label, pd.DataFrame(rows, columns=header)))
    return found


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("+", ""))


def curves() -> pd.DataFrame:
    """One row per setting and validation: epochs, tokens per type, the seeds' differences."""
    rows, seen = [], []
    for study, (name, tokens, types) in STUDIES.items():
        for label, table in tables(RESULTS / study / "differences_over_steps.md"):
            setting = dict(part.split("=") for part in label.split(", ")) if label else {}
            vocabulary = int(_number(setting["vocab_size"])) if "vocab_size" in setting else types
            width = setting.get("backbone/d_model")
            title = f"{name}{', width ' + width if width else ''}, {vocabulary:,} types"
            seeds = [c for c in table.columns if c.startswith("seed ")]
            if table[seeds].values.tolist() in seen:  # the same runs in another study's table
                continue
            seen.append(table[seeds].values.tolist())
            for _, row in table.iterrows():
                epochs = _number(row["epochs"])
                differences = [_number(row[s]) for s in seeds if row[s] not in ("", "–")]
                rows.append((title, epochs, epochs * tokens / vocabulary, differences))
    file, title, epochs, tokens, types = SHORT_BUDGET
    (_, table), *_ = [t for t in _head_tables(RESULTS / file)]
    untied = table[table["head"] == "untied"].iloc[0]
    differences = [_number(untied[c]) for c in table.columns if c.startswith("seed ")]
    rows.append((title, epochs, epochs * tokens / types, differences))
    return pd.DataFrame(rows, columns=["setting", "epochs", "tokens_per_type", "differences"])


def _head_tables(path: Path) -> list[tuple[str, pd.DataFrame]]:
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| head |"))
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in lines[i + 2 :] if r.startswith("|")]
    return [("", pd.DataFrame(rows, columns=[c.strip() for c in lines[i].strip("|").split("|")]))]


def draw(data: pd.DataFrame, out: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    for axis, name, label in (
        ("epochs", "figure1_untied_minus_tied_vs_epochs", "epochs"),
        (
            "tokens_per_type",
            "figure2_untied_minus_tied_vs_tokens_per_type",
            "training tokens per vocabulary type",
        ),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for setting, group in data.groupby("setting", sort=False):
            effects = [effect(d) for d in group["differences"]]
            x = group[axis].to_numpy()
            mean = [e.mean for e in effects]
            err = [[e.mean - (e.low if e.low is not None else e.mean) for e in effects],
                   [(e.high if e.high is not None else e.mean) - e.mean for e in effects]]  # fmt: skip
            ax.errorbar(x, mean, yerr=err, marker="o", markersize=3, capsize=2, label=setting)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss, untied - tied (nats/token)")
        ax.set_title("untied minus tied: above 0, the tie is ahead (mean of seeds, 95% CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"{name}.png", dpi=110))
    return paths


def summary(data: pd.DataFrame) -> str:
    last = data.groupby("setting", sort=False).tail(1)
    effects = family(list(last["differences"]))
    table = pd.DataFrame(
        {
            "setting": last["setting"],
            "epochs": [f"{e:.1f}" for e in last["epochs"]],
            "training tokens per type": [f"{x:,.0f}" for x in last["tokens_per_type"]],
            "untied - tied": effects,
        }
    )
    title = "Untied minus tied at each setting's last validation (nats/token; above 0, the tie is ahead)"
    return f"{title}: {policy_note(len(last))}.\n\n{markdown(table)}"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for table.md and the two figures")
    parser.add_argument("--update", type=Path, help="a document whose section gets the table and figures")
    parser.add_argument("--section", help="the section's name in --update")
    args = parser.parse_args(argv)
    problem = check_outputs(args.out, args.update, args.section)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    data = curves()
    publish(summary(data), args.out, lambda out: draw(data, out), args.update, args.section)
    return 0


if __name__ == "__main__":
    with pipe_safe_output():
        sys.exit(main())
