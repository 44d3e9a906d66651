"""BABILong samples (Kuratov et al. 2024, arXiv 2406.10149; benchmarks.md §1.1-1.2): bAbI facts hidden in
PG-19 background text, plus readers for the released data.

Construction (upstream ``babilong_utils``: SentenceSampler + NoiseInjectionDataset, re-implemented):

1. Background: pick a random book, a random character offset, a window of 10 x (tokens still needed)
   characters; split it into sentences (``split_sentences``, an untrained-Punkt approximation) and drop the
   first and last (probably cut) sentences. Tokenize each as ``" " + sentence``; skip sentences shorter than
   ``min_sentence_len`` tokens. Append until the target is reached, draw another book if needed, and cut the
   last sentence so the background has exactly the needed number of tokens.
2. Facts: tokenize each as ``" " + fact``. Background tokens = context tokens - fact tokens. Each fact picks
   one of the len(sentences)+1 gaps uniformly *with replacement*; the picks are sorted, so facts keep their
   order and a gap may hold several.
3. Lengths count tokens of the given tokenizer (GPT-2 in BABILong) with 300 held back for the prompt:
   ``len(context tokens) == L - 300`` for L > 0, with upstream create_tasks' decimal lengths ("1k" = 1000 ->
   700, "4k" = 4000 -> 3700, "1M" = 1,000,000); "0k" is the facts alone.
4. A record is ``{input: decode(tokens).strip(), question, target}``; the question keeps its trailing space.

Books come from a PG-19-layout directory (``metadata.csv`` + ``{train,validation,test}/<id>.txt``), read as
plain text files with Python I/O. Upstream draws from the PG-19 *test* split; so does the default.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memlm.errors import UserError, not_utf8
from memlm.eval.babi import generate_task, parse_babi_text, read_babi_file
from memlm.eval.babilong_scorer import check_task

PROMPT_RESERVE = 300  # tokens held back for the prompt (upstream create_tasks)
# Bumped whenever generated samples change for the same inputs (2: decimal lengths and upstream's fact count), so
# caches keyed by it (memlm.data.pipeline) are not reused across versions.
GENERATOR_VERSION = 2
LENGTHS: dict[str, int] = {
    "0k": 0,
    **{f"{2**i}k": 2**i * 1000 for i in range(10)},  # decimal, as upstream data/create_tasks.py
    "1M": 1_000_000,
    "10M": 10_000_000,  # not an upstream cell
}
FIELDS = ("input", "question", "target")


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def parse_length(length: str | int) -> int:
    """BABILong length name -> tokens: "0k" -> 0, "1k" -> 1000, ..., "512k" -> 512000, "1M" -> 10**6, "10M".

    An int is taken as a token count. Unknown names raise UserError.
    """
    if isinstance(length, int) and not isinstance(length, bool):
        if length < 0:
            raise UserError(f"length: must be >= 0, got {length}")
        return length
    key = str(length).strip()
    key = key[:-1] + "M" if key.endswith("m") else key[:-1] + "k" if key.endswith("K") else key
    if key not in LENGTHS:
        raise UserError(f"length: unknown BABILong length {length!r}; expected one of {', '.join(LENGTHS)}")
    return LENGTHS[key]


def context_tokens(length: str | int) -> int:
    """Context size in tokens: L - 300 for L > 0, 0 for "0k" (facts only)."""
    n = parse_length(length)
    if n == 0:
        return 0
    if n <= PROMPT_RESERVE:
        raise UserError(
            f"length: {length!r} leaves no context after the {PROMPT_RESERVE}-token prompt reserve"
        )
    return n - PROMPT_RESERVE


# ----------------------------------------------------------------------------------------------------------
# Sentence splitting and background text
# ----------------------------------------------------------------------------------------------------------

# A sentence ends at . ! ? (plus closing quotes/brackets) when whitespace and a capital letter -- possibly
# behind an opening quote or bracket -- follow. Approximates untrained NLTK Punkt: no abbreviation list (so
# "Mr. Smith" splits, as with untrained Punkt), but single-letter initials ("J. Smith") and ellipses ("...")
# do not end a sentence.
_BOUNDARY = re.compile(r"([.!?]+)([\"'\u201d\u2019)\]]*)(?=\s+[\"'\u201c\u2018(\[]*[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Deterministic sentence splitter (see ``_BOUNDARY``). Returns stripped, non-empty sentences; line
    breaks inside a sentence are kept, as Punkt keeps them."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        punct, i = m.group(1), m.start(1)
        if "..." in punct or "\u2026" in punct:
            continue
        if punct == "." and i >= 1 and text[i - 1].isalpha() and (i < 2 or not text[i - 2].isalnum()):
            continue  # single-letter initial
        sent = text[start : m.end()].strip()
        if sent:
            out.append(sent)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def list_books(books_dir: str | Path, split: str = "test") -> list[Path]:
    """The ``.txt`` books of a PG-19-layout directory: ``books_dir/split/*.txt`` (or ``books_dir/*.txt``)."""
    root = Path(books_dir)
    if not root.is_dir():
        raise UserError(f"{root}: books directory does not exist")
    books = sorted((root / split).glob("*.txt")) if (root / split).is_dir() else []
    if not books:
        books = sorted(root.glob("*.txt"))
    if not books:
        raise UserError(f"{root}: no books found (expected {split}/*.txt as in PG-19, with metadata.csv)")
    return books


class BackgroundSampler:
    """Draws background sentences (as token lists) from PG-19-layout books (upstream ``SentenceSampler``).

    The random stream is ``rng``, so a seeded ``random.Random`` gives reproducible samples.
    """

    def __init__(
        self,
        books_dir: str | Path,
        tokenizer: TextTokenizer,
        rng: random.Random,
        split: str = "test",
        min_sentence_len: int = 10,
        max_sentence_len: int | None = None,
    ):
        self.books = list_books(books_dir, split)
        self.tokenizer, self.rng = tokenizer, rng
        self.min_sentence_len, self.max_sentence_len = min_sentence_len, max_sentence_len
        self._texts: dict[Path, str] = {}

    def _text(self, path: Path) -> str:
        if path not in self._texts:
            try:
                self._texts[path] = path.read_text(encoding="utf-8")  # as training reads books: no silent U+FFFD
            except UnicodeDecodeError as e:
                raise not_utf8(path, e) from e
            except OSError as e:
                raise UserError(f"{path}: cannot read book ({e.strerror or e})") from e
        return self._texts[path]

    def sample(self, n_tokens: int) -> list[list[int]]:
        """Sentences whose token lists total exactly ``n_tokens`` (the last one is cut)."""
        sentences: list[list[int]] = []
        total, fruitless = 0, 0
        while total < n_tokens:
            text = self._text(self.rng.choice(self.books))
            window = max(10 * (n_tokens - total), 2000)
            start = self.rng.randrange(max(1, len(text) - window))
            sents = split_sentences(text[start : start + window])[1:-1]  # first/last are probably cut
            added = False
            for s in sents:
                toks = list(self.tokenizer.encode(" " + s))
                if len(toks) < self.min_sentence_len:
                    continue
                if self.max_sentence_len is not None and len(toks) > self.max_sentence_len:
                    continue
                sentences.append(toks)
                total += len(toks)
                added = True
                if total >= n_tokens:
                    break
            fruitless = 0 if added else fruitless + 1
            if fruitless > 100:
                raise UserError(
                    f"{self.books[0].parent}: books yield no sentences of >= {self.min_sentence_len} tokens"
                )
        if total > n_tokens:
            sentences[-1] = sentences[-1][: len(sentences[-1]) - (total - n_tokens)]
        return sentences


# ----------------------------------------------------------------------------------------------------------
# Noise injection
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BuiltSample:
    """One BABILong sample in tokens.

    input_tokens: [context_tokens] (exactly L - 300 for L > 0); fact_spans: [n_facts] (start, end) token
    offsets of each fact inside input_tokens, in fact order.
    """

    input_tokens: list[int]
    fact_spans: list[tuple[int, int]]
    question: str
    target: str

    def record(self, tokenizer: TextTokenizer) -> dict[str, str]:
        return {
            "input": tokenizer.decode(self.input_tokens).strip(),
            "question": self.question,
            "target": self.target,
        }


def build_sample_tokens(
    sample: dict,
    length: str | int,
    tokenizer: TextTokenizer,
    rng: random.Random,
    background: BackgroundSampler | None = None,
) -> BuiltSample:
    """Hide a bAbI sample's facts in background text (upstream ``NoiseInjectionDataset``).

    ``sample`` = {facts, question, answer} as from ``memlm.eval.babi``. Raises UserError if the facts alone
    exceed the context, or if a length > 0 has no background sampler.
    """
    n_ctx = context_tokens(length)
    facts = [list(tokenizer.encode(" " + f)) for f in sample["facts"]]
    n_facts = sum(len(f) for f in facts)
    if n_ctx == 0:
        bg: list[list[int]] = []
    else:
        if n_facts > n_ctx:
            raise UserError(
                f"length {length}: the facts need {n_facts} tokens, more than the {n_ctx}-token context"
            )
        if background is None:
            raise UserError(f"length {length}: a books directory is needed for background text")
        bg = background.sample(n_ctx - n_facts) if n_ctx > n_facts else []
    # Each fact picks one of the len(bg)+1 gaps, with replacement; sorting keeps the facts in order.
    gaps = sorted(rng.randint(0, len(bg)) for _ in facts) if n_ctx else [0] * len(facts)
    tokens: list[int] = []
    spans: list[tuple[int, int]] = []
    fi = 0
    for gap in range(len(bg) + 1):
        while fi < len(facts) and gaps[fi] == gap:
            spans.append((len(tokens), len(tokens) + len(facts[fi])))
            tokens += facts[fi]
            fi += 1
        if gap < len(bg):
            tokens += bg[gap]
    return BuiltSample(tokens, spans, sample["question"], sample["answer"])


def build_sample(
    sample: dict,
    length: str | int,
    tokenizer: TextTokenizer,
    rng: random.Random,
    background: BackgroundSampler | None = None,
) -> dict[str, str]:
    """One released-format record ``{input, question, target}`` (see ``build_sample_tokens``)."""
    return build_sample_tokens(sample, length, tokenizer, rng, background).record(tokenizer)


def _fits(sample: dict, length: str | int, tokenizer: TextTokenizer) -> bool:
    n_ctx = context_tokens(length)
    if n_ctx == 0:
        return True
    # upstream create_tasks: max_n_facts = (L - 300) // 8, and get_dataset_df keeps a sample if its rows, the
    # facts plus the question row, are <= max_n_facts: so at most max_n_facts - 1 facts
    if len(sample["facts"]) + 1 > n_ctx // 8:
        return False
    return sum(len(tokenizer.encode(" " + f)) for f in sample["facts"]) <= n_ctx


def build_dataset(
    task: str,
    length: str | int,
    n_samples: int,
    books_dir: str | Path | None,
    tokenizer: TextTokenizer,
    seed: int,
    babi_path: str | Path | None = None,
    split: str = "test",
    min_sentence_len: int = 10,
) -> list[dict[str, str]]:
    """``n_samples`` BABILong records ``{input, question, target}`` for ``task`` at ``length``.

    Facts come from ``babi_path`` (an official or generated bAbI file) or, for qa1-qa5 without one, from the
    seeded generator. Samples whose facts do not fit (more than (L-300)//8 facts, as upstream, or more
    fact tokens than the context) are skipped. Deterministic in (task, length, n_samples, seed, books).
    """
    check_task(task)
    if n_samples < 1:
        raise UserError(f"n_samples: must be >= 1, got {n_samples}")
    context_tokens(length)  # validates the length
    rng = random.Random(f"babilong:{task}:{length}:{seed}")
    if babi_path is not None:
        pool = [s for s in read_babi_file(babi_path) if _fits(s, length, tokenizer)]
        if len(pool) < n_samples:
            raise UserError(
                f"{babi_path}: only {len(pool)} questions fit {task} at {length}; {n_samples} requested"
            )
    elif task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
        n_stories = n_samples
        while True:
            text = generate_task(task, n_stories, seed)
            pool = [s for s in parse_babi_text(text, f"<generated {task}>") if _fits(s, length, tokenizer)]
            if len(pool) >= n_samples:
                break
            if n_stories > 64 * n_samples + 64:
                raise UserError(f"length {length}: too few generated {task} questions fit the context")
            n_stories *= 2
    else:
        raise UserError(f"task {task}: the generator covers qa1-qa5; pass a bAbI file (babi_path) for {task}")
    chosen = rng.sample(pool, n_samples)
    background = None
    if parse_length(length) > 0:
        if books_dir is None:
            raise UserError(f"length {length}: a books directory is needed for background text")
        background = BackgroundSampler(
            books_dir, tokenizer, rng, split=split, min_sentence_len=min_sentence_len
        )
    return [build_sample(s, length, tokenizer, rng, background) for s in chosen]


# ----------------------------------------------------------------------------------------------------------
# Released data: RMT-team/babilong (data/qa{N}/{len}.json) and babilong-1k-samples (parquet)
# ----------------------------------------------------------------------------------------------------------


def _validate_records(rows: list[Any], path: Path) -> list[dict[str, str]]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: record {i}: expected an object with {', '.join(FIELDS)}")
        for f in FIELDS:
            if f not in row:
                raise UserError(f"{path}: record {i}: missing field '{f}'")
            if not isinstance(row[f], str):
                raise UserError(
                    f"{path}: record {i}: field '{f}' must be a string, got {type(row[f]).__name__}"
                )
        out.append({f: row[f] for f in FIELDS})
    return out


def read_babilong_json(path: str | Path) -> list[dict[str, str]]:
    """Read a released ``{len}.json``: a JSON list of ``{input, question, target}`` (JSON lines accepted)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}) nor JSON lines (line {i + 1})"
                ) from None
    if isinstance(data, dict) and all(isinstance(data.get(f), list) for f in FIELDS):
        n = len(data["input"])  # columnar {input: [...], question: [...], target: [...]}
        if any(len(data[f]) != n for f in FIELDS):
            raise UserError(f"{path}: columns input/question/target have different lengths")
        data = [{f: data[f][i] for f in FIELDS} for i in range(n)]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records with {', '.join(FIELDS)}")
    return _validate_records(data, path)


def read_babilong_parquet(path: str | Path) -> list[dict[str, str]]:
    """Read a parquet shard with columns input, question, target (needs pyarrow)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for bad files
        raise UserError(f"{path}: cannot read parquet ({e})") from e
    for f in FIELDS:
        if f not in table.column_names:
            raise UserError(f"{path}: missing column '{f}'")
    return _validate_records(table.select(list(FIELDS)).to_pylist(), path)


def load_babilong_dir(root: str | Path, task: str, length: str) -> list[dict[str, str]]:
    """Records for (task, length) from a local copy of the released data.

    Looks for ``{root}/data/{task}/{length}.json`` or ``{root}/{task}/{length}.json`` (RMT-team/babilong),
    then
    parquet: ``{root}/{length}/{task}-*.parquet`` shards (babilong-1k-samples) or
    ``{root}/{length}/{task}/*.parquet`` (the parquet-converter layout), each also under ``{root}/data``.
    """
    check_task(task)
    parse_length(length)
    root = Path(root)
    for base in (root / "data", root):
        for ext, reader in ((".json", read_babilong_json), (".parquet", read_babilong_parquet)):
            p = base / task / f"{length}{ext}"
            if p.is_file():
                return reader(p)
        shards = sorted((base / length).glob(f"{task}-*.parquet")) + sorted(
            (base / length / task).glob("*.parquet")
        )
        if shards:
            return [r for s in shards for r in read_babilong_parquet(s)]
    raise UserError(
        f"{root}: no BABILong data for {task} at {length} (looked for data/{task}/{length}.json "
        f"and {length}/{task}-*.parquet)"
    )


def write_babilong_json(path: str | Path, records: list[dict[str, str]]) -> Path:
    """Write records in the released layout (a JSON list); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps([{f: r[f] for f in FIELDS} for r in records], ensure_ascii=False, indent=1),
        encoding="utf-8",
    )
    return path
