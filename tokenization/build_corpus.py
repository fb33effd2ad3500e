"""Build a small English text corpus offline, from the CPython standard library.

Why this source: the demo model and its tokenizer must be reproducible on a fresh
machine with no network and no Hub access. Every Python installation ships its
standard library as `.py` source, and the docstrings in it are a few megabytes of
well-edited English prose (with some code), which is enough for a demo tokenizer
and a toy optical language model.

Where the text comes from and its licence: the docstrings of the CPython standard
library found under ``sysconfig.get_paths()["stdlib"]``. They are part of CPython,
Copyright (c) Python Software Foundation, distributed under the Python Software
Foundation License (PSF-2.0, https://docs.python.org/3/license.html).

How: each `.py` file is parsed with `ast` and never imported (importing stdlib
modules can have side effects: `antigravity` opens a web browser, `this` prints).
Module, class and function docstrings are taken with
``ast.get_docstring(node, clean=True)``. Test suites, IDLE, lib2to3, ensurepip,
turtledemo and site-packages are skipped, because they are either not prose or not
part of the standard library proper.

Determinism: files are visited in sorted order and duplicates are removed keeping
the first one, so the same Python version always yields the same corpus. A
different CPython version has different docstrings, hence a different corpus.

This module imports only the standard library, so other scripts can load it by
file path without installing anything.

CLI::

    python tokenization/build_corpus.py --out data/corpus.jsonl [--max-chars N]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}
)
MIN_DOC_CHARS = 80

_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: Path | None = None) -> Iterator[Path]:
    """Yield the stdlib `.py` files in a platform-independent sorted order.

    Sorting on the POSIX relative path (not on `os.walk` order, which depends on
    the file system) is what makes the corpus reproducible.
    """
    root = Path(root) if root is not None else stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    for _, path in sorted(found):
        yield path


def normalise(text: str) -> str:
    """Light clean-up that keeps the paragraph and line structure.

    Line breaks carry meaning in docstrings (paragraphs, lists, code examples), and
    the renderer draws them, so only trailing spaces, tabs and runs of blank lines
    are touched.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def docstrings_of_source(source: bytes) -> list[str]:
    """Docstrings of one module's source in source order; [] if it does not parse.

    Some stdlib files are deliberately invalid or target another Python version;
    they are skipped rather than failing the build.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []
    nodes = [node for node in ast.walk(tree) if isinstance(node, _DOCSTRING_NODES)]
    # ast.walk is breadth-first; sorting by position gives reading order.
    nodes.sort(key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docs.append(doc)
    return docs


def build_corpus(max_chars: int | None = None, root: Path | str | None = None) -> list[str]:
    """Return the corpus as a list of documents (one docstring each).

    `max_chars` caps the total size: documents are taken whole, in order, until
    the next one would exceed it, so a capped corpus is a prefix of the full one.
    """
    seen: set[str] = set()
    docs: list[str] = []
    total = 0
    for path in iter_stdlib_files(Path(root) if root is not None else None):
        for raw in docstrings_of_source(path.read_bytes()):
            doc = normalise(raw)
            if len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            if max_chars is not None and total + len(doc) > max_chars:
                return docs
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
    return docs


def is_heldout(doc: str, heldout_fraction: float = 0.02) -> bool:
    """Stable membership test: a document's side of the split depends only on its text.

    sha256 (not Python's `hash`, which is salted per process) keeps the split the
    same across runs, machines and corpus sizes, so held-out text is never trained
    on, even by a later run on a larger or capped corpus.
    """
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_documents(docs: Sequence[str], heldout_fraction: float = 0.02) -> tuple[list[str], list[str]]:
    """Split into (train, heldout), keeping the original order inside each part."""
    train, heldout = [], []
    for doc in docs:
        (heldout if is_heldout(doc, heldout_fraction) else train).append(doc)
    return train, heldout


def write_jsonl(docs: Sequence[str], out: Path | str) -> None:
    """JSON lines keep document boundaries exact, even for documents with blank lines."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path | str) -> list[str]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpus.jsonl", help="output JSON-lines file")
    parser.add_argument("--max-chars", type=int, default=None, help="cap on the total number of characters")
    args = parser.parse_args(argv)

    docs = build_corpus(max_chars=args.max_chars)
    write_jsonl(docs, args.out)
    train, heldout = split_documents(docs)
    print(
        f"wrote {args.out}: {len(docs)} documents, {sum(map(len, docs))} characters "
        f"(train {len(train)} docs, held-out {len(heldout)} docs)"
    )


if __name__ == "__main__":
    main()
