"""PG-19 accounting (closed forms for a unigram model, a hand-made segment curve), window plans, memory reset
per book, and evaluate_pg19 end to end with fake models (resume, crash, official word counts)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from memlm.data.tokenizers import ByteTokenizer
from memlm.errors import NonFiniteOutput, UserError
from memlm.eval.pg19 import (
    OFFICIAL_WORDS,
    book_stats,
    combine_stats,
    evaluate_pg19,
    pg19_metrics,
    score_sequences,
    window_plan,
)
from tests.data.textgen import lines_text, write_pg19_tree

pytestmark = pytest.mark.unit

TOK = ByteTokenizer()  # ids = byte + 3, eos 1, pad 0, vocab 259
V = TOK.vocab_size


def _unigram(seed: int = 0) -> np.ndarray:
    """A fixed distribution over the 259 ids (every id has mass)."""
    w = np.random.default_rng(seed).uniform(0.5, 2.0, size=V)
    return w / w.sum()


# ------------------------------------------------------------------------------------------------------------
# Fake models
# ------------------------------------------------------------------------------------------------------------


class FakeLM:
    """Duck-typed LoadedModel. kind: "unigram" (logits = log p, any context), "position" (memory model: the
    true next token (t+1) mod V gets logit 0.01 * (position in the book + 1), via a carry that counts tokens),
    "window" (stateless: logit (position in the window + 1) for (t+1) mod V)."""

    def __init__(self, kind: str, stateless: bool, segment_len: int = 8, max_seq_len: int = 16,
                 fail_after_calls: int | None = None, nan_token: int | None = None):
        self.kind, self.stateless, self.segment_len = kind, stateless, segment_len
        self.nan_token = nan_token  # logits are NaN wherever the input token is this id (a diverged model)
        self.vocab_size = V
        self.tokenizer = TOK
        self.config = SimpleNamespace(model=SimpleNamespace(max_seq_len=max_seq_len, vocab_size=V))
        self.logp = np.log(_unigram()).astype(np.float32)
        self.calls, self.fail_after_calls = 0, fail_after_calls
        self.inits: list[int] = []

    def _tick(self):
        self.calls += 1
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise RuntimeError("simulated crash")

    def init_carry(self, b: int):
        self.inits.append(b)
        return np.zeros(b, np.int64)

    def _next_logits(self, tokens: np.ndarray, scale: np.ndarray) -> np.ndarray:
        b, n = tokens.shape
        out = np.zeros((b, n, V), np.float32)
        nxt = (tokens + 1) % V
        out[np.arange(b)[:, None], np.arange(n)[None, :], nxt] = scale
        return out

    def step_segment(self, carry, tokens, start_pos):
        self._tick()
        tokens = np.asarray(tokens)
        b, n = tokens.shape
        assert n == self.segment_len and np.all(carry == start_pos), (carry, start_pos)
        if self.kind == "unigram":
            logits = np.broadcast_to(self.logp, (b, n, V)).copy()
        else:
            pos = carry[:, None] + np.arange(n)[None, :]
            logits = self._next_logits(tokens, 0.01 * (pos + 1))
        if self.nan_token is not None:
            logits[tokens == self.nan_token] = np.nan
        return logits, carry + n

    def logits(self, tokens):
        self._tick()
        tokens = np.asarray(tokens)
        b, n = tokens.shape
        assert n <= self.config.model.max_seq_len
        if self.kind == "unigram":
            logits = np.broadcast_to(self.logp, (b, n, V)).copy()
        else:
            logits = self._next_logits(tokens, np.broadcast_to(np.arange(n) + 1.0, (b, n)))
        if self.nan_token is not None:
            logits[tokens == self.nan_token] = np.nan
        return logits


def _nll_true_next(scale: float) -> float:
    """NLL of the token carrying logit `scale` against V-1 zeros, in float64."""
    return -(scale - math.log(math.exp(scale) + V - 1))


# ------------------------------------------------------------------------------------------------------------
# Pure accounting
# ------------------------------------------------------------------------------------------------------------


def test_unigram_closed_form():
    p = _unigram()
    texts = [lines_text(1, 30), lines_text(2, 7) + "naïve café\n", lines_text(3, 55)]
    nlls, ntok, words, nbytes = [], [], [], []
    for t in texts:
        seq = TOK.encode(t) + [TOK.eos_id]
        nlls.append([-math.log(p[x]) for x in seq[1:]])
        ntok.append(len(seq))
        words.append(len(t.split()))
        nbytes.append(len(t.encode("utf-8")))
    m = pg19_metrics(nlls, ntok, words, nbytes, segment_len=16)

    # Independent closed form: counts of each byte after the first one of every book, plus one eos per book.
    counts: Counter = Counter()
    for t in texts:
        counts.update(t.encode("utf-8")[1:])
    total = sum(c * -math.log(p[b + 3]) for b, c in counts.items()) + len(texts) * -math.log(p[TOK.eos_id])
    n_scored = sum(counts.values()) + len(texts)
    n_words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert m["scored_tokens"] == n_scored and m["words"] == n_words and m["bytes"] == n_bytes
    assert m["word_perplexity"] == pytest.approx(math.exp(total / n_words), rel=1e-12)
    assert m["token_perplexity"] == pytest.approx(math.exp(total / n_scored), rel=1e-12)
    assert m["byte_perplexity"] == pytest.approx(math.exp(total / n_bytes), rel=1e-12)
    assert m["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-12)
    assert m["bits_per_token"] == pytest.approx(total / n_scored / math.log(2), rel=1e-12)
    # official totals replace the word count only
    o = pg19_metrics(nlls, ntok, words, nbytes, 16, total_words=OFFICIAL_WORDS["validation"])
    assert o["word_perplexity"] == pytest.approx(math.exp(total / 3_007_061), rel=1e-12)
    assert o["whitespace_words"] == n_words and o["word_count_source"] == "official"
    assert o["bits_per_byte"] == m["bits_per_byte"]


def test_segment_curve_hand_made():
    m = pg19_metrics([[1, 2, 3, 4, 5], [10, 20, 30]], [6, 4], [3, 2], [10, 8], segment_len=2)
    seg = m["segments"]
    assert [s["segment"] for s in seg] == [0, 1, 2]
    assert [s["tokens"] for s in seg] == [4, 3, 1]
    assert [s["books"] for s in seg] == [2, 2, 1]
    assert [s["nll"] for s in seg] == pytest.approx([33 / 4, 37 / 3, 5.0])
    assert [s["perplexity"] for s in seg] == pytest.approx([math.exp(33 / 4), math.exp(37 / 3), math.exp(5)])
    assert m["token_nll"] == pytest.approx(75 / 8)
    assert m["word_perplexity"] == pytest.approx(math.exp(75 / 5))
    assert m["bits_per_byte"] == pytest.approx(75 / 18 / math.log(2))


def test_accounting_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="scored targets"):
        book_stats([1.0, 2.0], n_tokens=4, words=1, n_bytes=1, segment_len=2)
    with pytest.raises(ValueError, match="non-finite"):
        book_stats([1.0, float("nan")], n_tokens=3, words=1, n_bytes=1, segment_len=2)
    with pytest.raises(UserError, match="no books"):
        combine_stats([])


# ------------------------------------------------------------------------------------------------------------
# Windows (stateless models)
# ------------------------------------------------------------------------------------------------------------


def test_window_plan_examples_and_properties():
    assert window_plan(10, 4) == [(0, 4, 0), (4, 8, 4), (8, 10, 8)]
    assert window_plan(10, 4, 2) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert window_plan(3, 4) == [(0, 3, 0)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = int(rng.integers(1, 12))
        s = int(rng.integers(1, w + 1))
        n = int(rng.integers(1, 60))
        seen = np.zeros(n, int)
        for a, b, f in window_plan(n, w, s):
            assert 0 <= a <= f < b <= n and b - a <= w
            seen[f:b] += 1
            if a > 0:
                assert f - a >= w - s  # every target after the first window has >= w - s tokens of context
        assert np.all(seen == 1)
    with pytest.raises(UserError, match="--stride"):
        window_plan(10, 4, 5)


@pytest.mark.parametrize("stride", [None, 3, 1])
def test_stateless_windows_score_every_target_with_its_context(stride):
    W = 8
    lm = FakeLM("window", stateless=True, max_seq_len=W)
    seqs = [np.arange(5, 5 + n, dtype=np.int32) % V for n in (30, 9, 2, 1)]  # next token = token + 1
    got = dict(score_sequences(lm, seqs, batch_size=3, stride=stride))
    S = stride or W
    for i, seq in enumerate(seqs):
        m = len(seq) - 1
        expect = []
        for j in range(m):  # window k ends at W + k*S; j's window is the first one ending after j
            e = W if j < W else W + ((j - W) // S + 1) * S
            expect.append(_nll_true_next(j - (e - W) + 1.0))
        np.testing.assert_allclose(got[i], expect, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------------------
# Memory models: streaming and reset per book
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_memory_is_reset_at_every_book(batch_size):
    lm = FakeLM("position", stateless=False, segment_len=8)
    seqs = [np.arange(n, dtype=np.int32) % V + 3 for n in (20, 41, 8, 17, 2)]
    got = dict(score_sequences(lm, seqs, batch_size=batch_size))
    for i, seq in enumerate(seqs):
        # the carry counts tokens since the book began: position j in the book, not in the stream
        expect = [_nll_true_next(0.01 * (j + 1)) for j in range(len(seq) - 1)]
        np.testing.assert_allclose(got[i], expect, rtol=1e-5)
    assert sum(lm.inits) == len(seqs)  # one fresh row of memory per book
    with pytest.raises(UserError, match="--stride"):
        list(score_sequences(lm, seqs, stride=4))


# ------------------------------------------------------------------------------------------------------------
# evaluate_pg19 with a fake unigram model
# ------------------------------------------------------------------------------------------------------------


def _closed_form(texts: list[str]) -> tuple[float, int]:
    p = _unigram()
    total, n = 0.0, 0
    for t in texts:
        seq = TOK.encode(t) + [TOK.eos_id]
        total += sum(-math.log(p[x]) for x in seq[1:])
        n += len(seq) - 1
    return total, n


@pytest.mark.parametrize("stateless", [False, True])
def test_evaluate_pg19_outputs_resume_and_crash(tmp_path, stateless):
    texts = write_pg19_tree(tmp_path / "pg", {"train": [1], "validation": [10, 11, 12]}, n_lines=12)
    val = [texts[i] for i in (10, 11, 12)]
    total, n_scored = _closed_form(val)
    words = sum(len(t.split()) for t in val)

    lm = FakeLM("unigram", stateless)
    s = evaluate_pg19(lm, str(tmp_path / "pg"), "validation", str(tmp_path / "out"), progress=False,
                      run_info={"model": "fake"})
    assert s["books"] == 3 and s["scored_tokens"] == n_scored and s["words"] == words
    assert s["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-5)
    assert s["token_perplexity"] == pytest.approx(math.exp(total / n_scored), rel=1e-5)
    assert s["dataset"].startswith("PG-19 layout (not") and s["word_count_source"].startswith("whitespace")
    for k in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert k in s["results"]["pg19_validation"]
    doc = json.loads((tmp_path / "out" / "pg19_validation.json").read_text())
    assert doc["word_perplexity"] == s["word_perplexity"] and doc["tokenizer"] == "bytes"
    assert (tmp_path / "out" / "pg19_validation_ppl_by_segment.png").read_bytes()[:4] == b"\x89PNG"
    assert sum(x["tokens"] for x in doc["segments"]) == n_scored

    # rerun: everything is already there, the model is not called
    lm2 = FakeLM("unigram", stateless)
    s2 = evaluate_pg19(lm2, str(tmp_path / "pg"), "validation", str(tmp_path / "out"), progress=False,
                       run_info={"model": "fake"})
    assert lm2.calls == 0 and s2["word_perplexity"] == s["word_perplexity"]

    # crash after the first model call: finished books are kept, a rerun completes them
    crash = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate_pg19(FakeLM("unigram", stateless, segment_len=4096, max_seq_len=4096, fail_after_calls=1),
                      str(tmp_path / "pg"), "validation", str(crash), progress=False, run_info={"model": "fake"})
    kept = (crash / "pg19_validation_books.jsonl").read_text().splitlines()
    assert len(kept) == 1
    with open(crash / "pg19_validation_books.jsonl", "a") as f:
        f.write('{"book_id": 11, "n_tok')  # a line cut by the crash
    lm3 = FakeLM("unigram", stateless, segment_len=4096, max_seq_len=4096)
    s3 = evaluate_pg19(lm3, str(tmp_path / "pg"), "validation", str(crash), progress=False,
                       run_info={"model": "fake"})
    assert lm3.calls == 2 and s3["books"] == 3
    assert s3["word_perplexity"] == pytest.approx(s["word_perplexity"], rel=1e-6)

    # a different setting is refused unless --restart
    with pytest.raises(UserError, match="max_tokens_per_book"):
        evaluate_pg19(lm, str(tmp_path / "pg"), "validation", str(tmp_path / "out"), max_tokens_per_book=50,
                      progress=False, run_info={"model": "fake"})

    # damaged result files are named, not a traceback (session 16's audit), and are left as they are
    rows_path, state_path = crash / "pg19_validation_books.jsonl", crash / "pg19_validation_run.json"
    good_rows, good_state = rows_path.read_bytes(), state_path.read_bytes()
    for path, damage, needle in ((rows_path, b'"hello"\n', "line 4 is not a book's result"),
                                 (rows_path, b'{"book_id": 121}\n', "line 4 is not a book's result"),
                                 (rows_path, b"\xff\xfe\n", "not UTF-8"),
                                 (state_path, None, "not a PG-19 evaluation state")):
        path.write_bytes(b"[1, 2]" if damage is None else good_rows + damage)
        with pytest.raises(UserError, match=needle):
            evaluate_pg19(lm, str(tmp_path / "pg"), "validation", str(crash), progress=False,
                          run_info={"model": "fake"})
        assert path.read_bytes() == (b"[1, 2]" if damage is None else good_rows + damage)
        rows_path.write_bytes(good_rows)
        state_path.write_bytes(good_state)



@pytest.mark.parametrize("stateless", [False, True])
def test_non_finite_nll_names_the_book_and_keeps_the_finished_ones(tmp_path, stateless):
    """A model that returns NaN (as a diverged Titans memory does) stops the run with NonFiniteOutput naming the
    book and the first bad token; books scored before it stay in the JSONL, and a fixed model resumes."""
    texts = write_pg19_tree(tmp_path / "pg", {"validation": [10, 11, 12]}, n_lines=12)
    marked = texts[11][:40] + "~" + texts[11][40:]
    (tmp_path / "pg" / "validation" / "11.txt").write_text(marked, encoding="utf-8")
    tilde = TOK.encode("~")[0]
    assert all("~" not in texts[i] for i in (10, 12))
    kw = {"segment_len": 4096, "max_seq_len": 4096}  # one model call per book (longest first)
    with pytest.raises(NonFiniteOutput, match=r"pg19 book 11: .* non-finite at scored token 40 of") as e:
        evaluate_pg19(FakeLM("unigram", stateless, nan_token=tilde, **kw), str(tmp_path / "pg"), "validation",
                      str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value) and "inner_grad_clip" in str(e.value)
    rows = (tmp_path / "out" / "pg19_validation_books.jsonl").read_text().splitlines()
    kept = [json.loads(x)["book_id"] for x in rows]
    assert kept and 11 not in kept and f"the {len(kept)} books scored before it are kept" in str(e.value)
    s = evaluate_pg19(FakeLM("unigram", stateless, **kw), str(tmp_path / "pg"), "validation", str(tmp_path / "out"),
                      progress=False)
    assert s["books"] == 3

def test_truncation_counts_the_scored_prefix(tmp_path):
    texts = write_pg19_tree(tmp_path / "pg", {"validation": [3, 4]}, n_lines=12)
    s = evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o"),
                      max_tokens_per_book=100, progress=False)
    p = _unigram()
    prefixes = [texts[i].encode()[:100] for i in (3, 4)]
    total = sum(-math.log(p[b + 3]) for pre in prefixes for b in pre[1:])  # no eos: the books were cut
    assert s["truncated_books"] == 2 and s["scored_tokens"] == 2 * 99
    assert s["bytes"] == 200 and s["words"] == sum(len(x.decode().split()) for x in prefixes)
    assert s["bits_per_byte"] == pytest.approx(total / 200 / math.log(2), rel=1e-5)
    assert "subset" in s["word_count_source"] or "not the official" in s["word_count_source"]


def _official_tree(root: Path, n_val: int) -> dict[int, str]:
    """metadata.csv with 28,752 rows and n_val small validation books."""
    (root / "validation").mkdir(parents=True)
    texts = {}
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        for i in range(28_752):
            w.writerow([100 + i, f"Book {i}, a title", "1900", f"http://x/{100 + i}"])
    for i in range(n_val):
        texts[100 + i] = lines_text(i, 3)
        (root / "validation" / f"{100 + i}.txt").write_text(texts[100 + i])
    return texts


def test_official_word_count_only_for_the_whole_official_split(tmp_path):
    texts = _official_tree(tmp_path / "pg", 50)
    total, _ = _closed_form([texts[k] for k in sorted(texts)])
    s = evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o1"),
                      progress=False)
    assert s["dataset"].startswith("PG-19 (official") and s["words"] == 3_007_061
    assert s["word_perplexity"] == pytest.approx(math.exp(total / 3_007_061), rel=1e-5)
    assert s["whitespace_words"] == sum(len(t.split()) for t in texts.values())
    sub = evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o2"),
                        max_books=3, progress=False)
    assert sub["words"] == sub["whitespace_words"] and "subset" in sub["word_count_source"]
    ws = evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o3"),
                       word_count="whitespace", progress=False)
    assert ws["words"] == ws["whitespace_words"]


def test_not_official_with_49_books(tmp_path):
    _official_tree(tmp_path / "pg", 49)
    s = evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o"),
                      progress=False)
    assert s["words"] == s["whitespace_words"] and "not the official" in s["word_count_source"]


def test_bad_trees(tmp_path):
    (tmp_path / "nometa" / "validation").mkdir(parents=True)
    (tmp_path / "nometa" / "validation" / "1.txt").write_text("text")
    with pytest.raises(UserError, match="metadata.csv"):
        evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "nometa"), "validation", str(tmp_path / "o"),
                      progress=False)
    write_pg19_tree(tmp_path / "pg", {"validation": [1]})
    (tmp_path / "pg" / "validation" / "2.txt").write_text("not in metadata")
    with pytest.raises(UserError, match="2.txt"):
        evaluate_pg19(FakeLM("unigram", False), str(tmp_path / "pg"), "validation", str(tmp_path / "o"),
                      progress=False)
