"""PG-19 layout checks without tensorflow: metadata.csv (no header: book_id,title,publication_date,book_link;
titles may contain commas and are CSV-quoted) and `<split>/<book_id>.txt` files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from memlm.errors import UserError

PG19_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class BookMeta:
    book_id: int
    title: str
    publication_date: str
    book_link: str


def read_metadata(path: str) -> dict[int, BookMeta]:
    """Parse a PG-19 metadata.csv into {book_id: BookMeta}. Malformed rows raise UserError (file:line)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: PG-19 metadata.csv not found")
    books: dict[int, BookMeta] = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 4:
                    raise UserError(
                        f"{path}: line {line}: expected 4 fields book_id,title,publication_date,book_link, "
                        f"got {len(row)}"
                    )
                try:
                    book_id = int(row[0])
                except ValueError:
                    raise UserError(f"{path}: line {line}: book_id {row[0]!r} is not an integer") from None
                if book_id in books:
                    raise UserError(f"{path}: line {line}: duplicate book_id {book_id}")
                books[book_id] = BookMeta(book_id, row[1], row[2], row[3])
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot parse metadata ({type(e).__name__}: {e})") from None
    return books


def pg19_split_files(root: str, split: str) -> tuple[dict[int, BookMeta], list[tuple[int, str]]]:
    """Validate a PG-19 tree for one split; returns (metadata, [(book_id, file)] sorted by book_id)."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: PG-19 directory not found")
    if split not in PG19_SPLITS:
        raise UserError(f"split: PG-19 has splits {', '.join(PG19_SPLITS)}, got {split!r}")
    meta = read_metadata(os.path.join(root, "metadata.csv"))
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir}: PG-19 split directory not found")
    files = []
    for fname in os.listdir(split_dir):
        if not fname.endswith(".txt"):
            continue
        stem = fname[: -len(".txt")]
        if not stem.isdigit():
            raise UserError(f"{os.path.join(split_dir, fname)}: PG-19 book files must be named <book_id>.txt")
        book_id = int(stem)
        if book_id not in meta:
            raise UserError(f"{os.path.join(split_dir, fname)}: book {book_id} is missing from metadata.csv")
        files.append((book_id, os.path.join(split_dir, fname)))
    files.sort()
    return meta, files
