"""Made-up fixture text for the data tests: seeded word salad, text directories and PG-19 trees."""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = (
    "the a of and to in was she he it Mary John Sandra Daniel went travelled journeyed moved back kitchen "
    "garden hallway office bedroom bathroom apple football milk picked up dropped gave letter morning "
    "evening house ball carriage walk sister brother mother father said replied très café naïve"
).split()


def lines_text(seed: int, n_lines: int, words_per_line: int = 9) -> str:
    """Seeded lines of words ending in '.', joined with newlines (with a trailing newline)."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        ws = [r.choice(WORDS) for _ in range(r.randint(max(1, words_per_line - 4), words_per_line + 4))]
        lines.append(" ".join(ws).capitalize() + ".")
    return "\n".join(lines) + "\n"


def write_text_dir(root: Path, n_docs: int = 3, n_lines: int = 40, seed: int = 0) -> dict[str, str]:
    """A flat text_dir of doc<i>.txt; returns {stem: text}."""
    root.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n_docs):
        texts[f"doc{i}"] = lines_text(seed * 1000 + i, n_lines)
        (root / f"doc{i}.txt").write_text(texts[f"doc{i}"], encoding="utf-8")
    return texts


def write_pg19_tree(
    root: Path, books: dict[str, list[int]], seed: int = 0, n_lines: int = 30
) -> dict[int, str]:
    """A PG-19 tree; books maps split -> book ids. Titles contain commas and quotes. Returns {id: text}."""
    texts = {}
    rows = []
    for split, ids in books.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for book_id in ids:
            text = f"BOOK {book_id}\n\n" + lines_text(seed * 1000 + book_id, n_lines)
            (root / split / f"{book_id}.txt").write_text(text, encoding="utf-8")
            texts[book_id] = text
            rows.append([book_id, f'Title {book_id}, or, "The Test"', "1850", f"http://x/{book_id}"])
    with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return texts
