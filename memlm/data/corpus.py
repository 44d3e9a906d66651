"""Tokenized document corpora: load a split of a text directory or a PG-19 tree, cache it as flat int32.

Sources (benchmarks.md §3-§4):
  * "text_dir": a directory of UTF-8 *.txt files, one document per file. If the directory has split
    subdirectories (any of train/ validation/ test/), split S is DIR/S/*.txt. Otherwise every DIR/*.txt
    is split *inside* the file at line boundaries: the first 90% of its characters are "train", the next
    5% "validation", the last 5% "test" (each cut moves forward to the next line start), so the splits
    never overlap and every file contributes to each split. Documents with no non-whitespace text are
    skipped.
  * "pg19": the PG-19 layout (metadata.csv without header + train/ validation/ test/ of <book_id>.txt),
    read through the `local_pg19` TFDS builder. Documents are ordered by book_id.

Reading goes through the seqio Tasks of memlm.data.seqio_tasks (tensorflow is imported only on a cache
miss). Every document is encoded with the Tokenizer and gets eos_id appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from memlm.data.local_pg19.metadata import pg19_split_files
from memlm.data.tokenizers import Tokenizer, fingerprint_of
from memlm.errors import UserError

__all__ = ["Corpus", "load_corpus", "iter_text_split", "read_text_split", "text_split_files", "SOURCES"]

SOURCES = ("text_dir", "pg19")
TEXT_SPLITS = ("train", "validation", "test")
# Character fractions [start, end) of each file that form each split in a flat text_dir.
HELDOUT_FRACTIONS = {"train": (0.0, 0.90), "validation": (0.90, 0.95), "test": (0.95, 1.0)}
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- text_dir splitting


def _has_split_dirs(root: str) -> bool:
    return any(os.path.isdir(os.path.join(root, s)) for s in TEXT_SPLITS)


def text_split_files(root: str, split: str) -> list[str]:
    """The *.txt files (sorted) that split `split` of text directory `root` is read from."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: text directory not found")
    if _has_split_dirs(root):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserError(f"{split_dir}: split directory not found (the corpus has split subdirectories)")
        base = split_dir
    else:
        if split not in TEXT_SPLITS:
            raise UserError(f"split: expected one of {', '.join(TEXT_SPLITS)}, got {split!r}")
        base = root
    return sorted(str(p) for p in Path(base).glob("*.txt") if p.is_file())


def _line_start_at_or_after(text: str, frac: float) -> int:
    """The first line start at or after character len(text) * frac (0 and len(text) are line starts)."""
    p = int(len(text) * frac)
    if p <= 0:
        return 0
    if p >= len(text):
        return len(text)
    q = text.find("\n", p - 1)
    return q + 1 if q >= 0 else len(text)


def _read_utf8(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def iter_text_split(root: str, split: str) -> Iterator[tuple[str, str]]:
    """Yield (document name, text) of one split of a text directory (rules in the module docstring)."""
    files = text_split_files(root, split)
    flat = not _has_split_dirs(root)
    for f in files:
        text = _read_utf8(f)
        if flat:
            lo, hi = HELDOUT_FRACTIONS[split]
            text = text[_line_start_at_or_after(text, lo) : _line_start_at_or_after(text, hi)]
        if text.strip():
            yield Path(f).stem, text


def read_text_split(root: str, split: str) -> list[tuple[str, str]]:
    return list(iter_text_split(root, split))


# ----------------------------------------------------------------------------- Corpus


class Corpus:
    """Tokenized documents stored flat: tokens int32 [total_tokens], offsets int64 [num_docs + 1].

    doc(i) = tokens[offsets[i]:offsets[i+1]] (ends with the tokenizer's eos). Loaded corpora are memmaps.
    doc_words[i] = len(text.split()) of document i (for word-level perplexity, benchmarks.md §3.2).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        name: str,
        doc_names: Sequence[str] | None = None,
        doc_words: Sequence[int] | np.ndarray | None = None,
        pad_id: int = 0,
        eos_id: int | None = None,
    ) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if tokens.ndim != 1 or offsets.ndim != 1 or offsets.size < 1:
            raise ValueError("Corpus: tokens and offsets must be 1-D, offsets non-empty")
        if offsets[0] != 0 or offsets[-1] != tokens.shape[0] or np.any(np.diff(offsets) < 0):
            raise ValueError("Corpus: offsets must rise from 0 to len(tokens)")
        self._tokens = tokens
        self._offsets = offsets
        self.name = name
        self.pad_id = int(pad_id)  # the batcher pads with this (from the tokenizer)
        self.eos_id = None if eos_id is None else int(eos_id)
        n = offsets.size - 1
        self.doc_names = list(doc_names) if doc_names is not None else [str(i) for i in range(n)]
        self.doc_words = (
            np.asarray(doc_words, dtype=np.int64) if doc_words is not None else np.zeros(n, dtype=np.int64)
        )
        if len(self.doc_names) != n or self.doc_words.shape != (n,):
            raise ValueError("Corpus: doc_names / doc_words must have one entry per document")

    @classmethod
    def from_docs(
        cls,
        docs: Sequence[Sequence[int] | np.ndarray],
        name: str = "in-memory",
        doc_names: Sequence[str] | None = None,
        doc_words: Sequence[int] | None = None,
        pad_id: int = 0,
        eos_id: int | None = None,
    ) -> Corpus:
        arrays = [np.asarray(d, dtype=np.int32).reshape(-1) for d in docs]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return cls(tokens.astype(np.int32), offsets, name, doc_names, doc_words, pad_id, eos_id)

    @property
    def num_docs(self) -> int:
        return int(self._offsets.size - 1)

    @property
    def total_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def total_words(self) -> int:
        return int(self.doc_words.sum())

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [num_docs]: tokens per document, eos included."""
        return np.diff(self._offsets)

    def doc(self, i: int) -> np.ndarray:
        """int32 [len_i]: the tokens of document i, eos last (a read-only view, no copy)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs})")
        view = np.asarray(self._tokens[self._offsets[i] : self._offsets[i + 1]])
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"Corpus({self.name!r}, docs={self.num_docs}, tokens={self.total_tokens})"

    # ---- on-disk format: tokens.npy, offsets.npy, meta.json

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "tokens.npy"), np.asarray(self._tokens, dtype=np.int32))
        np.save(os.path.join(directory, "offsets.npy"), self._offsets)
        self._save_meta(directory, {})

    def _save_meta(self, directory: str, extra: dict) -> None:
        meta = {"version": CACHE_VERSION, "name": self.name, "pad_id": self.pad_id, "eos_id": self.eos_id,
                "doc_names": self.doc_names, "doc_words": self.doc_words.tolist(), **extra}
        with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, directory: str) -> Corpus:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        tokens = np.load(os.path.join(directory, "tokens.npy"), mmap_mode="r")
        offsets = np.load(os.path.join(directory, "offsets.npy"))
        return cls(tokens, offsets, meta["name"], meta["doc_names"], meta["doc_words"], meta["pad_id"],
                   meta["eos_id"])


# ----------------------------------------------------------------------------- loading


def _load_cache_entry(directory: str) -> Corpus:
    """A tokenized split from the cache; a damaged entry (edited, truncated) is named, not guessed around."""
    try:
        return Corpus.load(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSON / numpy format errors are ValueErrors
        raise UserError(f"{directory}: damaged corpus cache entry ({type(e).__name__}: {str(e)[:200]}); delete "
                        "this directory and the split is tokenized again") from None


def _stat_entries(files: Sequence[str], root: str) -> list:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


class _DocSink:
    """Collects (order key, name, words, tokens) and builds a Corpus sorted by order key.

    With a directory, tokens stream to a raw file (PG-19 train does not fit in memory) and the final
    tokens.npy is written in sorted order from a memmap of it; otherwise everything stays in memory.
    """

    def __init__(self, directory: str | None, pad_id: int, eos_id: int):
        self.directory = directory
        self.ids = (pad_id, eos_id)
        self.entries: list[tuple[int, str, int, int, int]] = []  # key, name, words, start, length
        self.arrays: list[np.ndarray] = []
        self.pos = 0
        self._raw = open(os.path.join(directory, "tokens.bin"), "wb") if directory else None

    def add(self, key: int, name: str, words: int, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        if self._raw is not None:
            self._raw.write(tokens.tobytes())
        else:
            self.arrays.append(tokens)
        self.entries.append((key, name, words, self.pos, tokens.size))
        self.pos += tokens.size

    def finish(self, name: str) -> Corpus:
        order = sorted(range(len(self.entries)), key=lambda j: self.entries[j][0])
        ents = [self.entries[j] for j in order]
        lengths = np.array([e[4] for e in ents], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        names, words = [e[1] for e in ents], [e[2] for e in ents]
        if self._raw is None:
            tokens = np.concatenate([self.arrays[j] for j in order]) if order else np.zeros(0, np.int32)
            return Corpus(tokens.astype(np.int32), offsets, name, names, words, *self.ids)
        self._raw.close()
        raw_path = os.path.join(self.directory, "tokens.bin")
        out = np.lib.format.open_memmap(
            os.path.join(self.directory, "tokens.npy"), mode="w+", dtype=np.int32, shape=(self.pos,)
        )
        if self.pos:
            raw = np.memmap(raw_path, dtype=np.int32, mode="r", shape=(self.pos,))
            for e, dst in zip(ents, offsets[:-1], strict=True):
                out[dst : dst + e[4]] = raw[e[3] : e[3] + e[4]]
            del raw
        out.flush()
        del out
        os.remove(raw_path)
        np.save(os.path.join(self.directory, "offsets.npy"), offsets)
        tokens = np.load(os.path.join(self.directory, "tokens.npy"), mmap_mode="r")
        return Corpus(tokens, offsets, name, names, words, *self.ids)

    def abort(self) -> None:
        if self._raw is not None and not self._raw.closed:
            self._raw.close()


def load_corpus(
    source: str, path: str, split: str, tokenizer: Tokenizer, cache_dir: str | None = None
) -> Corpus:
    """Load split `split` of a "text_dir" or "pg19" source, tokenized, from cache_dir when possible.

    The cache entry cache_dir/corpus/<key>/ is keyed by (source, absolute path, split, tokenizer
    fingerprint, names/sizes/mtimes of the files read); it holds tokens.npy, offsets.npy and meta.json.
    With cache_dir None nothing is written except a temporary TFDS copy (pg19) that is deleted after.
    """
    if source not in SOURCES:
        raise UserError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    root = os.path.abspath(path)
    if source == "text_dir":
        files = text_split_files(root, split)
        if not files:
            where = os.path.join(root, split) if _has_split_dirs(root) else root
            raise UserError(f"{where}: no *.txt documents for split {split!r}")
        stats = _stat_entries(files, root)
        all_stats = stats
    else:
        _, books = pg19_split_files(root, split)
        if not books:
            raise UserError(f"{os.path.join(root, split)}: no <book_id>.txt books for split {split!r}")
        meta_stat = _stat_entries([os.path.join(root, "metadata.csv")], root)
        stats = meta_stat + _stat_entries([f for _, f in books], root)
        # The TFDS copy is keyed by the whole tree, so one Task serves every split.
        all_stats = meta_stat + [
            e for s in ("train", "validation", "test") if os.path.isdir(os.path.join(root, s))
            for e in _stat_entries(sorted(str(p) for p in Path(root, s).glob("*.txt")), root)
        ]
    key = _digest([CACHE_VERSION, source, root, split, fingerprint_of(tokenizer), stats])
    name = f"{source}:{os.path.basename(root)}:{split}:{tokenizer.name}"

    if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UserError(f"{cache_dir}: the cache dir (data.cache_dir / --cache-dir) is a file, not a directory")
    final_dir = os.path.join(cache_dir, "corpus", key) if cache_dir else None
    if final_dir and os.path.isfile(os.path.join(final_dir, "meta.json")):
        return _load_cache_entry(final_dir)

    tmp_dir = None
    tfds_tmp = None
    try:
        if final_dir:
            os.makedirs(os.path.dirname(final_dir), exist_ok=True)
            tmp_dir = tempfile.mkdtemp(prefix=key + ".tmp", dir=os.path.dirname(final_dir))
        tfds_dir = None
        if source == "pg19":
            if cache_dir:
                tfds_dir = os.path.join(cache_dir, "tfds", _digest([CACHE_VERSION, root, all_stats]))
            else:
                tfds_tmp = tfds_dir = tempfile.mkdtemp(prefix="memlm-tfds-")
        sink = _DocSink(tmp_dir, tokenizer.pad_id, tokenizer.eos_id)
        try:
            from memlm.data import seqio_tasks  # lazy: imports tensorflow and seqio

            for index, doc_name, text, tokens in seqio_tasks.iter_documents(
                source, root, split, tokenizer, tfds_dir
            ):
                # Why check: an out-of-range id would be clamped silently by a JAX embedding gather.
                if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
                    raise ValueError(
                        f"tokenizer {tokenizer.name} produced ids outside [0, {tokenizer.vocab_size})"
                    )
                sink.add(index, doc_name, len(text.split()), tokens)
        finally:
            sink.abort()
        if not sink.entries:
            raise UserError(f"{root}: split {split!r} has no documents")
        corpus = sink.finish(name)
        if corpus.total_tokens <= corpus.num_docs:
            raise UserError(f"{root}: split {split!r} has no tokens (every document is empty)")
        if final_dir:
            corpus._save_meta(tmp_dir, {"source": source, "path": root, "split": split,
                                        "tokenizer": fingerprint_of(tokenizer)})
            del corpus
            # mkdtemp made it 0700: the entry takes its parent's mode (makedirs made that one under the umask),
            # so a cache shared by a group stays readable to it
            os.chmod(tmp_dir, stat.S_IMODE(os.stat(os.path.dirname(final_dir)).st_mode))
            try:
                os.rename(tmp_dir, final_dir)
            except OSError:  # another process finished the same entry first; use theirs
                shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir = None
            return _load_cache_entry(final_dir)
        return corpus
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if tfds_tmp:
            shutil.rmtree(tfds_tmp, ignore_errors=True)
