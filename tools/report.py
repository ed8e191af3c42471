"""What every report tool does with its result: print it, write it with its figures into ``--out``, and
put it into a document's generated section (``--update``, ``--section``); and the one place matplotlib
is told to draw into files.

Used by compare.py, buckets.py, data_regime.py, embeddings.py and frontier.py, which find it beside
them on the import path (Python puts a script's folder first).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lmheads.errors import ConfigError, failed_write, file_in_the_way, mend
from lmheads.files import write_whole

BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A report's ``main``, which gives a ``ConfigError`` (a run's record that does not parse, from
    :func:`lmheads.files.read_record`), or a full disk under what it writes, as one ``error:`` line and
    exit status 2."""

    @functools.wraps(main)
    def reporting(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Exception as err:
            if (full := failed_write(err)) is None:
                raise
            what = full.filename or "the report"
            print(
                f"error: {what} could not be written ({full.strerror}); {mend(full)}, or give --out or "
                "--update another place; each file the report wrote is whole, the others as they were",
                file=sys.stderr,
            )
            return 2

    return reporting


def pyplot():
    """matplotlib's pyplot, drawing into files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, **options) -> Path:
    """``fig.savefig(path, **options)`` whole or not at all (a full disk leaves the figure that was there
    as it was), and the figure closed."""
    write_whole(path, lambda tmp: fig.savefig(tmp, **options))
    pyplot().close(fig)
    return path


def markdown(frame) -> str:
    """A table (a ``pandas.DataFrame`` of cells already formatted as text) as a markdown table: every
    report's tables go through here."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def markers(section: str | None) -> tuple[str, str]:
    """The comment pair around a document's generated section (``compare:<section>:begin`` if named)."""
    if not section:
        return BEGIN, END
    return f"<!-- compare:{section}:begin -->", f"<!-- compare:{section}:end -->"


def check_outputs(out: Path | None, update: Path | None = None, section: str | None = None) -> str:
    """Why ``--out`` or ``--update`` could not be written ("" if they can), asked before anything is
    written: a report that stops half-way would leave its table without the document, or the reverse."""
    if out is not None and (why := file_in_the_way(out)):
        return f"--out {why}; give a folder for the table and plots"
    if update is None:
        return ""
    if update.is_file():
        return section_problem(update, update.read_text(), section)
    if update.exists() or not update.parent.is_dir():
        return f"--update {update} is not a markdown file in an existing folder"
    return ""


def section_problem(doc: Path, content: str, section: str | None) -> str:
    """Why the document ``doc`` (its text ``content``) has not one section to replace ("" where it has):
    no markers, markers more than once (which section?), or its end before its beginning."""
    begin, end = markers(section)
    if begin not in content or end not in content:
        return f"{doc} has no {begin} ... {end} section"
    if content.count(begin) > 1 or content.count(end) > 1:
        return (
            f"{doc} has {begin} or {end} more than once; name each section (<!-- compare:NAME:begin --> "
            "... <!-- compare:NAME:end -->) and give --section NAME"
        )
    if content.index(end) < content.index(begin):
        return f"{doc} has {end} before {begin}; put the section's end after its beginning"
    return ""


def update_document(doc: Path, text: str, section: str | None = None) -> None:
    begin, end = markers(section)
    content = doc.read_text() if doc.is_file() else f"{begin}\n{end}\n"
    if problem := section_problem(doc, content, section):
        raise SystemExit(f"error: {problem}")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_whole(doc, lambda tmp: tmp.write_text(f"{head}{begin}\n{text}\n{end}{tail}"))


def publish(
    text: str,
    out: Path | None,
    draw: Callable[[Path], list[Path]] | None = None,
    update: Path | None = None,
    section: str | None = None,
    name: str = "table",
    alt: str | None = None,
) -> None:
    """Print ``text``; with ``out``, write it as ``<name>.md`` there and the figures ``draw(out)`` makes;
    with ``update``, put it (and links to those figures, relative to the document, described by ``alt``
    or their file names) into its section."""
    print(text)
    images: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_whole(out / f"{name}.md", lambda tmp: tmp.write_text(text + "\n"))
        images = draw(out) if draw is not None else []
        print("wrote " + ", ".join(str(p) for p in [out / f"{name}.md", *images]))
    if update is not None:
        links = [f"![{alt or p.stem.replace('_', ' ')}]({os.path.relpath(p, update.parent)})" for p in images]
        update_document(update, "\n\n".join([text, "\n".join(links)]) if links else text, section)
        print(f"updated {update}")
