"""PG-19 evaluation (Rae et al. 2019, arXiv 1911.05507; benchmarks.md §3): stream every book through the model
with the memory reset at each book boundary, and report token, word and byte level scores plus perplexity by
segment index (the curve that shows memory at work).

Accounting (one book = one sequence; the same rules for every model kind):

* The scored sequence of a book is ``t_0 .. t_{n-1}`` = its text tokens followed by the tokenizer's eos (the
  document layout of training, memlm.data.batcher). With ``--max-tokens-per-book N`` a longer book is cut to
  its first N text tokens and gets no eos (the book does not end there).
* The first token has no context, so its NLL is undefined and it is **not scored**: the book contributes the
  n-1 terms ``nll_j = -log p(t_{j+1} | t_0..t_j)``, j = 0..n-2 (the eos prediction included, as in training
  and ``memlm eval lm``). Token perplexity = exp(sum nll / number of scored tokens).
* Words and bytes count the **whole book text** (or, when cut, the decoded text of its first N tokens): bytes
  are ``len(text.encode("utf-8"))``; words are ``len(text.split())``, or the official PG-19 totals
  (3,007,061 validation / 6,966,499 test words) when the directory is the real PG-19 and the whole split is
  scored (``detect_official``). word_perplexity = exp(sum nll / words) (the PG-19 paper's definition),
  byte_perplexity = exp(sum nll / bytes), bits_per_byte = sum nll / (bytes * ln 2) -- lm-eval's keys. The one
  unscored token per book makes these very slightly optimistic (one token in a book of ~10^5).
* Segment index of ``nll_j`` = j // segment_len: the segment (of the model's ``data.segment_len``) whose
  input position j produced the prediction. The curve is perplexity per index over all books that reach it.

Models with memory run ``LoadedModel.step_segment`` segment after segment from ``init_carry`` (a fresh memory
per book). Stateless models (no memory) see windows of ``model.max_seq_len`` input tokens through
``LoadedModel.logits``: by default non-overlapping (stride = window), so every target is scored once and the
context restarts at every window (target j sees j mod W + 1 tokens); with ``stride`` S < W the windows slide
by S and score only their last S targets (every target after the first window sees >= W - S + 1 tokens).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from memlm.errors import DIVERGENCE_HINT, NonFiniteOutput, UserError

OFFICIAL_WORDS = {"validation": 3_007_061, "test": 6_966_499}
OFFICIAL_BOOKS = {"train": 28_602, "validation": 50, "test": 100}
OFFICIAL_METADATA_ROWS = 28_752
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------
# Accounting (pure numpy; no model)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BookStats:
    """What one scored book contributes. ``seg_nll[k]`` / ``seg_count[k]``: NLL sum and count of the targets
    whose input position lies in segment k (j // segment_len == k)."""

    n_tokens: int  # tokens in the scored sequence (eos included when the book was not cut)
    n_scored: int  # n_tokens - 1
    nll_sum: float  # nats, float64 sum
    words: int
    bytes: int
    seg_nll: list[float] = field(default_factory=list)
    seg_count: list[int] = field(default_factory=list)
    book_id: int | None = None
    title: str = ""
    truncated: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def book_stats(nll: Sequence[float] | np.ndarray, n_tokens: int, words: int, n_bytes: int,
               segment_len: int, **extra) -> BookStats:
    """Summarise one book: ``nll`` float [n_tokens - 1] (nll[j] = -log p(t_{j+1} | t_0..t_j))."""
    nll = np.asarray(nll, dtype=np.float64).reshape(-1)
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    if n_tokens < 1 or nll.size != n_tokens - 1:
        raise ValueError(f"a book of {n_tokens} tokens has {max(n_tokens - 1, 0)} scored targets, got {nll.size}")
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        raise NonFiniteOutput(f"pg19 book {extra.get('book_id', '?')}: the model's NLL is non-finite at scored "
                              f"token {bad[0]} of {nll.size} ({DIVERGENCE_HINT})")
    seg = np.arange(nll.size) // segment_len
    n_seg = int(seg[-1]) + 1 if nll.size else 0
    seg_nll = np.bincount(seg, weights=nll, minlength=n_seg) if nll.size else np.zeros(0)
    seg_count = np.bincount(seg, minlength=n_seg) if nll.size else np.zeros(0, np.int64)
    return BookStats(int(n_tokens), int(nll.size), float(math.fsum(nll.tolist())), int(words), int(n_bytes),
                     seg_nll.tolist(), [int(c) for c in seg_count], **extra)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def combine_stats(books: Sequence[BookStats], total_words: int | None = None,
                  word_count_source: str = "whitespace") -> dict:
    """Corpus metrics from per-book stats. ``total_words`` overrides the sum of per-book words (official)."""
    if not books:
        raise UserError("pg19: no books were scored")
    nll = math.fsum(b.nll_sum for b in books)
    n_scored = sum(b.n_scored for b in books)
    ws_words = sum(b.words for b in books)
    n_words = ws_words if total_words is None else int(total_words)
    n_bytes = sum(b.bytes for b in books)
    if n_scored == 0:
        raise UserError("pg19: no scored tokens (every book is shorter than 2 tokens)")
    k_max = max(len(b.seg_nll) for b in books)
    seg_sum, seg_cnt, seg_books = np.zeros(k_max), np.zeros(k_max, np.int64), np.zeros(k_max, np.int64)
    for b in books:
        k = len(b.seg_nll)
        seg_sum[:k] += np.asarray(b.seg_nll, np.float64)
        seg_cnt[:k] += np.asarray(b.seg_count, np.int64)
        seg_books[:k] += 1
    segments = [
        {"segment": k, "tokens": int(seg_cnt[k]), "books": int(seg_books[k]),
         "nll": float(seg_sum[k] / seg_cnt[k]), "perplexity": _exp(float(seg_sum[k] / seg_cnt[k]))}
        for k in range(k_max) if seg_cnt[k] > 0
    ]
    token_nll = nll / n_scored
    out = {
        "books": len(books),
        "tokens": sum(b.n_tokens for b in books),
        "scored_tokens": n_scored,
        "words": n_words,
        "whitespace_words": ws_words,
        "word_count_source": word_count_source,
        "bytes": n_bytes,
        "nll_sum": nll,
        "token_nll": token_nll,
        "token_perplexity": _exp(token_nll),
        "bits_per_token": token_nll / LN2,
        "word_perplexity": _exp(nll / n_words) if n_words else float("nan"),
        "byte_perplexity": _exp(nll / n_bytes) if n_bytes else float("nan"),
        "bits_per_byte": nll / (n_bytes * LN2) if n_bytes else float("nan"),
        "segments": segments,
    }
    return out


def pg19_metrics(nll_per_book: Sequence[Sequence[float] | np.ndarray], tokens_per_book: Sequence[int],
                 words_per_book: Sequence[int], bytes_per_book: Sequence[int], segment_len: int,
                 total_words: int | None = None, word_count_source: str | None = None) -> dict:
    """PG-19 metrics from per-token NLLs (module docstring: the accounting).

    Args:
      nll_per_book: per book, float [tokens_per_book[i] - 1]: nll[j] = -log p(t_{j+1} | t_0..t_j) in nats.
      tokens_per_book: tokens in each scored sequence (first token included, though it is not scored).
      words_per_book, bytes_per_book: words / UTF-8 bytes of each book's text.
      segment_len: segment size of the perplexity-by-segment curve.
      total_words: the official word total of the split, replacing the per-book sum.
    Returns:
      {token_nll, token_perplexity, bits_per_token, word_perplexity, byte_perplexity, bits_per_byte,
       books, tokens, scored_tokens, words, whitespace_words, bytes, nll_sum, word_count_source,
       segments: [{segment, tokens, books, nll, perplexity}]}.
    """
    n = len(nll_per_book)
    if not (len(tokens_per_book) == len(words_per_book) == len(bytes_per_book) == n):
        raise ValueError("pg19_metrics: one entry per book in every argument")
    books = [book_stats(nll_per_book[i], tokens_per_book[i], words_per_book[i], bytes_per_book[i], segment_len)
             for i in range(n)]
    src = word_count_source or ("whitespace" if total_words is None else "official")
    return combine_stats(books, total_words, src)


def words_and_bytes(text: str) -> tuple[int, int]:
    """(whitespace-separated words, UTF-8 bytes) of a text."""
    return len(text.split()), len(text.encode("utf-8"))


def detect_official(meta_rows: int, split: str, n_books: int) -> bool:
    """The directory is the real PG-19 if metadata.csv has its 28,752 rows and the split holds its 50
    (validation) / 100 (test) books, all listed in metadata.csv (checked by the caller)."""
    return meta_rows == OFFICIAL_METADATA_ROWS and OFFICIAL_BOOKS.get(split) == n_books


# ----------------------------------------------------------------------------------------------------------
# Scoring with a model
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _nll_fn():
    import jax
    import jax.numpy as jnp

    def f(logits, targets):  # float [b, n, V], int32 [b, n] -> float32 [b, n]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]

    return jax.jit(f)


def token_nll_from_logits(logits, targets) -> np.ndarray:
    """float64 [b, n]: -log softmax(logits)[targets] (computed where the logits live)."""
    return np.asarray(_nll_fn()(logits, np.asarray(targets, np.int32)), dtype=np.float64)


def window_plan(n_targets: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows for a stateless model: [(input_start, input_end, score_from)] covering targets 0..n_targets-1.

    Window k ends at e_k = window + k * stride (cut at n_targets), feeds inputs [e_k - window, e_k) and scores
    targets [e_{k-1}, e_k) (the first window scores all of its targets). Every target is scored exactly once;
    target j of window k sees j - (e_k - window) + 1 tokens. stride None (= window): non-overlapping windows,
    target j sees j mod window + 1 tokens.
    """
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise UserError(f"--stride: must be in [1, {window}] (the window, model.max_seq_len), got {stride}")
    plan, prev_end, end = [], 0, window
    while prev_end < n_targets:
        plan.append((end - window, min(end, n_targets), prev_end))
        prev_end, end = end, end + stride
    return plan


def _stream_batch(lm, seqs: list[np.ndarray], pad_id: int, tick: Callable[[int], None]) -> list[np.ndarray]:
    """Memory models: books side by side in one batch, segment by segment from a fresh carry."""
    L = int(lm.segment_len)
    B = len(seqs)
    m = [len(s) - 1 for s in seqs]
    n_steps = max((x + L - 1) // L for x in m)
    out = [np.zeros(x, np.float64) for x in m]
    carry = lm.init_carry(B)
    for s in range(n_steps):
        tok = np.full((B, L), pad_id, np.int32)
        tgt = np.zeros((B, L), np.int32)
        for r, seq in enumerate(seqs):
            a, b = s * L, min((s + 1) * L, m[r])
            if a < b:
                tok[r, : b - a] = seq[a:b]
                tgt[r, : b - a] = seq[a + 1 : b + 1]
        logits, carry = lm.step_segment(carry, tok, s * L)
        nll = token_nll_from_logits(logits, tgt)
        done = 0
        for r in range(B):
            a, b = s * L, min((s + 1) * L, m[r])
            if a < b:
                out[r][a:b] = nll[r, : b - a]
                done += b - a
        tick(done)
    return out


def _window_batches(lm, seqs: list[np.ndarray], pad_id: int, batch: int, stride: int | None,
                    tick: Callable[[int], None]) -> Iterator[tuple[int, np.ndarray]]:
    """Stateless models: windows of model.max_seq_len (window_plan) through LoadedModel.logits, padded to a
    fixed [batch, W] shape so the model compiles once (padding sits after the inputs: causal, no effect).
    Yields (index, nll) as soon as a sequence's last window is done."""
    W = int(lm.config.model.max_seq_len)
    vocab = int(getattr(lm, "vocab_size", lm.config.model.vocab_size))
    batch = max(1, min(batch, (1 << 28) // max(1, W * vocab)))  # logits come back to the host: cap ~1 GiB
    out: dict[int, np.ndarray] = {}
    left = {i: len(window_plan(len(s) - 1, W, stride)) for i, s in enumerate(seqs)}
    jobs = [(i, *w) for i, s in enumerate(seqs) for w in window_plan(len(s) - 1, W, stride)]
    for k in range(0, len(jobs), batch):
        chunk = jobs[k : k + batch]
        tok = np.full((batch, W), pad_id, np.int32)
        tgt = np.zeros((batch, W), np.int32)
        for r, (i, a, b, _) in enumerate(chunk):
            tok[r, : b - a] = seqs[i][a:b]
            tgt[r, : b - a] = seqs[i][a + 1 : b + 1]
        nll = token_nll_from_logits(lm.logits(tok), tgt)
        done = 0
        for r, (i, a, b, f) in enumerate(chunk):
            if i not in out:
                out[i] = np.zeros(len(seqs[i]) - 1, np.float64)
            out[i][f:b] = nll[r, f - a : b - a]
            done += b - f
            left[i] -= 1
        tick(done)
        for i in [i for i in out if left[i] == 0]:
            yield i, out.pop(i)


def score_sequences(lm, seqs: Sequence[np.ndarray], batch_size: int = 1, stride: int | None = None,
                    pad_id: int = 0, progress: Callable[[int], None] | None = None
                    ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, nll float64 [len(seq) - 1]) for every sequence, each from a fresh memory.

    ``lm``: a LoadedModel (or anything with its ``stateless``, ``segment_len``, ``init_carry``,
    ``step_segment``, ``logits`` and ``config.model.max_seq_len``). Sequences are batched longest first;
    a sequence is yielded as soon as it is finished.
    """
    tick = progress or (lambda n: None)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    order = [i for i in order if len(seqs[i]) >= 2]
    for i in range(len(seqs)):
        if len(seqs[i]) < 2:
            yield i, np.zeros(max(len(seqs[i]) - 1, 0), np.float64)
    if lm.stateless:
        for j, nll in _window_batches(lm, [np.asarray(seqs[i]) for i in order], pad_id, batch_size, stride, tick):
            yield order[j], nll
        return
    if stride is not None:
        raise UserError("--stride: only for models without memory (memory models stream whole books)")
    for k in range(0, len(order), max(1, batch_size)):
        idx = order[k : k + max(1, batch_size)]
        res = _stream_batch(lm, [np.asarray(seqs[i]) for i in idx], pad_id, tick)
        yield from zip(idx, res, strict=True)


# ----------------------------------------------------------------------------------------------------------
# The evaluation: books -> per-book JSONL (resumable) -> summary JSON + plot
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Book:
    book_id: int
    title: str
    path: str


def read_pg19_split(root: str | Path, split: str) -> tuple[list[Book], int]:
    """(books of ``split`` sorted by id, rows of metadata.csv). UserError for a bad tree."""
    from memlm.data.local_pg19.metadata import pg19_split_files

    meta, files = pg19_split_files(str(root), split)
    if not files:
        raise UserError(f"{os.path.join(str(root), split)}: no <book_id>.txt books for split {split!r}")
    return [Book(b, meta[b].title, f) for b, f in files], len(meta)


def _read_book(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def prepare_book(text: str, tokenizer, max_tokens: int | None) -> tuple[np.ndarray, int, int, bool]:
    """(scored sequence int32 [n], words, bytes, truncated) of one book (module docstring)."""
    from memlm.data.tokenizers import encode_to_array

    toks = encode_to_array(tokenizer, text)
    if max_tokens is not None and toks.size + 1 > max_tokens:
        seq = toks[:max_tokens]
        words, n_bytes = words_and_bytes(tokenizer.decode(seq.tolist()))
        return seq, words, n_bytes, True
    words, n_bytes = words_and_bytes(text)
    return np.concatenate([toks, np.array([tokenizer.eos_id], np.int32)]), words, n_bytes, False


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a per-book JSONL. A last line cut by a crash is dropped (and removed from the file, so new
    rows are appended after valid ones); a bad line elsewhere is a UserError."""
    if not path.is_file():
        return []
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text at byte {e.start} (delete the file or use --restart)") from None
    rows = []
    needed = {f.name for f in fields(BookStats)}
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
                break
            raise UserError(f"{path}: line {i} is not valid JSON (delete the file or use --restart)") from None
        if not isinstance(row, dict) or set(row) != needed or not isinstance(row["book_id"], int):
            raise UserError(f"{path}: line {i} is not a book's result (delete the file or use --restart)")
        rows.append(row)
    return rows


def plot_segment_curve(segments: list[dict], path: Path, title: str, segment_len: int) -> Path:
    """Token perplexity by segment index (with the number of books reaching each index)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [s["segment"] + 1 for s in segments]  # 1 = the first segment of a book (log axis friendly)
    ax.plot(xs, [s["perplexity"] for s in segments], marker="o" if len(xs) < 60 else None, linewidth=1.2)
    ax.set_xlabel(f"segment of the book (1 = first; {segment_len} tokens each)")
    ax.set_ylabel("token perplexity")
    ax.grid(alpha=0.3)
    if xs and max(xs) > 50:
        ax.set_xscale("log")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["books"] for s in segments], color="gray", linestyle=":", linewidth=1.0)
    ax2.set_ylabel("books reaching the segment", color="gray")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def validate_pg19_args(max_books: int | None, max_tokens_per_book: int | None, batch_size: int,
                       stride: int | None, word_count: str) -> None:
    """UserError for option values out of range (before any model is loaded)."""
    if word_count not in ("auto", "official", "whitespace"):
        raise UserError(f"--word-count: expected auto, official or whitespace, got {word_count!r}")
    for name, v, lo in (("--max-books", max_books, 1), ("--max-tokens-per-book", max_tokens_per_book, 2),
                        ("--batch-size", batch_size, 1), ("--stride", stride, 1)):
        if v is not None and v < lo:
            raise UserError(f"{name}: must be >= {lo}, got {v}")


def evaluate_pg19(lm, data_dir: str, split: str, out_dir: str, max_books: int | None = None,
                  max_tokens_per_book: int | None = None, batch_size: int = 1, stride: int | None = None,
                  word_count: str = "auto", restart: bool = False, progress: bool = True,
                  run_info: dict | None = None) -> dict:
    """Score ``split`` of a PG-19-layout tree with ``lm`` and write the outputs to ``out_dir``.

    Files: ``pg19_{split}_books.jsonl`` (one BookStats per finished book, appended as books finish, so a
    crash keeps them; a rerun with the same settings resumes), ``pg19_{split}.json`` (summary),
    ``pg19_{split}_ppl_by_segment.png``. Returns the summary dict.
    """
    validate_pg19_args(max_books, max_tokens_per_book, batch_size, stride, word_count)
    books, meta_rows = read_pg19_split(data_dir, split)
    n_split = len(books)
    official_tree = detect_official(meta_rows, split, n_split)
    books = books[:max_books] if max_books else books
    tokenizer = lm.tokenizer
    segment_len = int(lm.segment_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_path, state_path = out / f"pg19_{split}_books.jsonl", out / f"pg19_{split}_run.json"
    state = {
        **(run_info or {}),
        "data": os.path.abspath(data_dir),
        "split": split,
        "tokenizer": getattr(tokenizer, "fingerprint", tokenizer.name),
        "max_tokens_per_book": max_tokens_per_book,
        "stride": stride,
    }
    done = {}
    if state_path.is_file() and not restart:
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            raise UserError(f"{state_path}: not valid JSON (use --restart)") from None
        if not isinstance(old, dict):
            raise UserError(f"{state_path}: not a PG-19 evaluation state (use --restart)")
        diff = [k for k in state if old.get(k) != state[k]]
        if diff:
            raise UserError(f"{out}: holds a PG-19 evaluation with different {', '.join(diff)}; "
                            "use --restart to discard it or another --out")
        done = {int(r["book_id"]): r for r in _read_jsonl(rows_path)}
    else:
        rows_path.unlink(missing_ok=True)
    state_path.write_text(json.dumps(state, indent=2), encoding="utf-8")

    todo = [b for b in books if b.book_id not in done]
    prepared = []
    for b in todo:
        seq, words, n_bytes, cut = prepare_book(_read_book(b.path), tokenizer, max_tokens_per_book)
        if seq.size and (seq.min() < 0 or seq.max() >= lm.config.model.vocab_size):
            raise UserError(f"{b.path}: tokenizer {tokenizer.name} gives ids outside model.vocab_size="
                            f"{lm.config.model.vocab_size}")
        prepared.append((b, seq, words, n_bytes, cut))
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=sum(max(p[1].size - 1, 0) for p in prepared), desc=f"pg19 {split}", unit="tok",
                    unit_scale=True, dynamic_ncols=True)
        if done:
            pbar.write(f"pg19: resuming, {len(done)} of {len(books)} books already scored in {rows_path}")
    try:
        with open(rows_path, "a", encoding="utf-8") as f:
            for i, nll in score_sequences(lm, [p[1] for p in prepared], batch_size, stride,
                                          pad_id=int(getattr(tokenizer, "pad_id", 0) or 0),
                                          progress=pbar.update if pbar else None):
                b, seq, words, n_bytes, cut = prepared[i]
                try:
                    st = book_stats(nll, seq.size, words, n_bytes, segment_len, book_id=b.book_id, title=b.title,
                                    truncated=cut)
                except NonFiniteOutput as e:
                    raise NonFiniteOutput(f"{e}; the {len(done)} books scored before it are kept in "
                                          f"{rows_path}") from None
                done[b.book_id] = st.to_json()
                f.write(json.dumps(done[b.book_id]) + "\n")
                f.flush()
                if pbar is not None:
                    pbar.set_postfix_str(f"books {len(done)}/{len(books)}")
    finally:
        if pbar is not None:
            pbar.close()

    stats = [BookStats(**done[b.book_id]) for b in books]
    whole_split = len(books) == n_split and not any(s.truncated for s in stats)
    if word_count == "official" and split not in OFFICIAL_WORDS:
        raise UserError(f"--word-count official: PG-19 publishes word counts for validation and test, not {split!r}")
    use_official = word_count == "official" or (word_count == "auto" and official_tree and whole_split
                                                and split in OFFICIAL_WORDS)
    if use_official:
        src = f"official PG-19 {split} word count ({OFFICIAL_WORDS[split]:,})"
        if not (official_tree and whole_split):
            src += " (forced by --word-count official on a tree that is not the whole official split)"
    else:
        why = ("--word-count whitespace" if word_count == "whitespace"
               else "not the official PG-19 tree" if not official_tree
               else "a subset of the split (--max-books / --max-tokens-per-book)" if not whole_split
               else "no official count for this split")
        src = f"whitespace words of the scored text (len(text.split())): {why}"
    metrics = combine_stats(stats, OFFICIAL_WORDS[split] if use_official else None, src)
    name = getattr(tokenizer, "name", "?")
    dataset = (f"PG-19 (official tree: 28,752 metadata rows, {OFFICIAL_BOOKS.get(split)} {split} books)"
               if official_tree else "PG-19 layout (not the official PG-19)")
    summary = {
        **(run_info or {}),
        "data": os.path.abspath(data_dir),
        "split": split,
        "dataset": dataset,
        "tokenizer": name,
        "tokenizer_fingerprint": getattr(tokenizer, "fingerprint", name),
        "segment_len": segment_len,
        "scoring": ("stateless: windows of model.max_seq_len="
                    f"{lm.config.model.max_seq_len}, stride {stride or lm.config.model.max_seq_len}"
                    if lm.stateless else "memory: whole books streamed segment by segment, memory reset per book"),
        "accounting": {
            "scored_tokens": "tokens 1..n-1 of each book's sequence (text tokens + eos) given the prefix; "
                             "the first token has no context and is not scored",
            "truncation": (f"books longer than {max_tokens_per_book} tokens are cut to their first "
                           f"{max_tokens_per_book} tokens (no eos); words/bytes count the decoded prefix")
                          if max_tokens_per_book else "none",
            "words": metrics["word_count_source"],
            "bytes": "UTF-8 bytes of the scored text",
            "segments": f"segment k holds the targets predicted at input positions [k*{segment_len}, "
                        f"(k+1)*{segment_len})",
        },
        "max_books": max_books,
        "max_tokens_per_book": max_tokens_per_book,
        "truncated_books": sum(s.truncated for s in stats),
        **{k: v for k, v in metrics.items() if k != "segments"},
        "results": {f"pg19_{split}": {
            "alias": f"pg19_{split}",
            "word_perplexity,none": metrics["word_perplexity"],
            "byte_perplexity,none": metrics["byte_perplexity"],
            "bits_per_byte,none": metrics["bits_per_byte"],
            "token_perplexity,none": metrics["token_perplexity"],
        }},
        "segments": metrics["segments"],
        "books_detail": [{"book_id": s.book_id, "title": s.title, "tokens": s.n_tokens, "words": s.words,
                          "bytes": s.bytes, "truncated": s.truncated,
                          "token_perplexity": _exp(s.nll_sum / s.n_scored) if s.n_scored else None}
                         for s in stats],
    }
    json_path = out / f"pg19_{split}.json"
    json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    png = plot_segment_curve(metrics["segments"], out / f"pg19_{split}_ppl_by_segment.png",
                             f"PG-19 {split}: {summary.get('model', 'memlm')} ({name} tokens)", segment_len)
    summary["paths"] = {"json": str(json_path), "books_jsonl": str(rows_path), "plot_png": str(png)}
    return summary
