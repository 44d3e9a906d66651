"""Tokenizers: bytes, SentencePiece, and GPT-2 BPE from a tiktoken-format ranks file.

No tensorflow here: this module is imported by training and eval code that must not pay the TF import.

Every tokenizer exposes `name`, `vocab_size`, `eos_id`, `pad_id`, `encode(text) -> list[int]` and
`decode(ids) -> str`, plus `fingerprint` (name + a hash of the model file) that keys on-disk caches, and
`encode_array(text) -> np.ndarray[int32]` (a fast path the corpus builder uses).
`decode` drops pad/eos (and, for bytes, unk) ids, so decoding a generated continuation is just `decode(ids)`.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from memlm.errors import UserError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "GPT2Tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
    "TOKENIZER_KINDS",
]

TOKENIZER_KINDS = ("bytes", "sentencepiece", "gpt2")

# The regex GPT-2's encoder.py splits text with before BPE (contractions, letters, numbers, other, spaces).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_ENDOFTEXT = "<|endoftext|>"
GPT2_NUM_RANKS = 50256  # mergeable ranks 0..50255; <|endoftext|> = 50256 makes the vocab 50257


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer(abc.ABC):
    """The tokenizer protocol memlm relies on. Ids are ints in [0, vocab_size)."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    @property
    def fingerprint(self) -> str:
        """Identifies the exact vocabulary (cache key); defaults to `name`."""
        return self.name

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no eos added)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; pad and eos ids are skipped."""

    def encode_array(self, text: str) -> np.ndarray:
        """Like `encode`, as an int32 array [n_tokens]."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def fingerprint_of(tokenizer) -> str:
    """`tokenizer.fingerprint` if it has one (memlm's tokenizers do), else its name."""
    return str(getattr(tokenizer, "fingerprint", None) or tokenizer.name)


def encode_to_array(tokenizer, text: str) -> np.ndarray:
    """int32 [n]: `encode_array` when the tokenizer has it, else `encode`."""
    fast = getattr(tokenizer, "encode_array", None)
    return np.asarray(fast(text) if fast else tokenizer.encode(text), dtype=np.int32)


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Accepts lists, tuples, generators, numpy/jax arrays of any shape (flattened)."""
    if not hasattr(ids, "shape"):
        ids = list(ids)
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: pad 0, eos 1, unk 2, byte b -> b + 3 (the layout of seqio.ByteVocabulary); vocab 259."""

    OFFSET = 3

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 256 + self.OFFSET
        self.pad_id = 0
        self.eos_id = 1
        self.unk_id = 2

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(_as_int_list(ids), dtype=np.int64)
        # Why skip instead of fail: generated ids may contain specials; out-of-range ids are dropped too.
        keep = arr[(arr >= self.OFFSET) & (arr < self.vocab_size)] - self.OFFSET
        return keep.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (.model). eos/pad come from the model (memlm trains pad 0, eos 1, unk 2).

    A model without a pad piece (pad_id -1, e.g. many released LLM vocabularies) pads with eos: padded
    positions always carry loss_mask 0, so the id only has to be valid.
    """

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        path = str(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: SentencePiece model file not found")
        try:
            with open(path, "rb") as f:
                proto = f.read()
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a readable SentencePiece model ({type(e).__name__})") from None
        if sp.get_piece_size() <= 0:
            raise UserError(f"{path}: SentencePiece model has no pieces")
        if sp.eos_id() < 0:
            raise UserError(f"{path}: SentencePiece model defines no eos piece (train it with eos_id set)")
        self._sp = sp
        self.path = path
        self.vocab_size = int(sp.get_piece_size())
        self.eos_id = int(sp.eos_id())
        self.pad_id = int(sp.pad_id()) if sp.pad_id() >= 0 else self.eos_id
        self.unk_id = int(sp.unk_id())
        self.name = f"sentencepiece:{Path(path).stem}"
        self._digest = hashlib.sha256(proto).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self._digest}"

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        drop = {self.eos_id, self.pad_id}
        keep = [i for i in _as_int_list(ids) if i not in drop and 0 <= i < self.vocab_size]
        return self._sp.decode(keep)


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `<base64 token> <rank>` per line."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read BPE ranks file ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(contents.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, TypeError):
            raise UserError(f"{path}: line {lineno} is not '<base64 token> <rank>'") from None
    return ranks


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE (Radford et al. 2019) from a tiktoken-format ranks file (whisper's gpt2.tiktoken).

    eos = pad = <|endoftext|> = 50256; vocab 50257. Text is encoded as ordinary text: a literal
    "<|endoftext|>" inside a document is *not* turned into the special token.
    """

    def __init__(self, path: str) -> None:
        import tiktoken

        path = str(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: GPT-2 BPE ranks file not found")
        ranks = _read_tiktoken_ranks(path)
        if len(ranks) != GPT2_NUM_RANKS or set(ranks.values()) != set(range(GPT2_NUM_RANKS)):
            raise UserError(
                f"{path}: expected {GPT2_NUM_RANKS} GPT-2 BPE ranks 0..{GPT2_NUM_RANKS - 1}, got {len(ranks)}"
            )
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_ENDOFTEXT: GPT2_NUM_RANKS},
            explicit_n_vocab=GPT2_NUM_RANKS + 1,
        )
        self.path = path
        self.name = "gpt2"
        self.vocab_size = GPT2_NUM_RANKS + 1
        self.eos_id = GPT2_NUM_RANKS
        self.pad_id = GPT2_NUM_RANKS
        self._digest = _file_digest(path)[:16]

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self._digest}"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        keep = [i for i in _as_int_list(ids) if 0 <= i < self.eos_id]
        return self._enc.decode_bytes(keep).decode("utf-8", errors="replace")


def load_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
    """kind: "bytes" (path ignored), "sentencepiece" (a .model file) or "gpt2" (a tiktoken ranks file)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"tokenizer: unknown kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
    if not path:
        raise UserError(f"data.tokenizer_path: data.tokenizer={kind!r} needs a tokenizer file path")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return GPT2Tokenizer(path)


def _training_lines(src: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], str]:
    """Non-empty lines of the training text, and a label for error messages.

    A directory is read with the corpus rules for the "train" split (memlm.data.corpus.read_text_split), so
    held-out text never leaks into the vocabulary; a file or a list of files is used whole.
    """
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_dir():
            from memlm.data.corpus import read_text_split

            texts = [text for _, text in read_text_split(str(p), "train")]
            return [ln for t in texts for ln in t.splitlines() if ln.strip()], str(p)
        if not p.is_file():
            raise UserError(f"{p}: tokenizer training input not found")
        files = [p]
    else:
        files = [Path(f) for f in src]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise UserError(f"{missing[0]}: tokenizer training input not found")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{f}: cannot read tokenizer training text ({type(e).__name__})") from None
    label = ", ".join(str(f) for f in files) or "<no files>"
    return [ln for t in texts for ln in t.splitlines() if ln.strip()], label


def train_sentencepiece(
    input_dir_or_files: str | os.PathLike | Sequence[str | os.PathLike],
    out_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
) -> str:
    """Train a SentencePiece model (Kudo & Richardson 2018) with pad 0, eos 1, unk 2 and no bos.

    Returns the path of `<out_prefix>.model` (a `<out_prefix>.vocab` is written beside it).
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise UserError(f"--model-type: expected unigram or bpe, got {model_type!r}")
    if vocab_size < 4:
        raise UserError(f"--vocab-size: must be at least 4, got {vocab_size}")
    lines, label = _training_lines(input_dir_or_files)
    if not lines:
        raise UserError(f"{label}: tokenizer training corpus is empty")
    out_prefix = str(out_prefix)
    parent = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(parent, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=out_prefix,
            vocab_size=int(vocab_size),
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size too high (5000). Please set it to a value <= 812."
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"--vocab-size: SentencePiece training on {label} failed: {msg}") from None
    return out_prefix + ".model"
