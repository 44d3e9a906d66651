"""BABILong construction (exact lengths, facts in order, 0k, seeds), sentence splitting, released-data
readers.

Uses a byte-level tokenizer defined here; the GPT-2 test builds tiktoken's GPT-2 encoding from the
openai-whisper sdist asset (benchmarks.md §4.2) and is skipped when it cannot be fetched.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from memlm.errors import UserError
from memlm.eval.babi import parse_babi_text, write_task_file
from memlm.eval.babilong_data import (
    BackgroundSampler,
    build_dataset,
    build_sample,
    build_sample_tokens,
    context_tokens,
    list_books,
    load_babilong_dir,
    parse_length,
    read_babilong_json,
    read_babilong_parquet,
    split_sentences,
    write_babilong_json,
)
from memlm.eval.babilong_scorer import TASK_LABELS

pytestmark = pytest.mark.unit


class ByteTokenizer:
    name, vocab_size, eos_id, pad_id = "bytes", 256, None, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


WORDS = (
    "old house river morning letter garden carriage window friend brother sister mother evening "
    "walked spoke quietly looked towards across under before after never always slowly"
).split()


def _book(seed: int, n_sentences: int) -> str:
    r = random.Random(seed)
    sents = []
    for _ in range(n_sentences):
        words = [r.choice(WORDS) for _ in range(r.randint(4, 14))]
        sents.append(" ".join(words).capitalize() + r.choice([".", ".", "!", "?"]))
    text, line = [], ""
    for word in " ".join(sents).split(" "):  # PG-19 keeps ~70-column line wraps
        if len(line) + len(word) > 70:
            text.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(text + [line]) + "\n"


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pg19")
    (root / "test").mkdir()
    (root / "train").mkdir()
    with open(root / "metadata.csv", "w") as f:
        for i in range(3):
            f.write(f'{100 + i},"Book, number {i}",1900,http://example.invalid/{i}\n')
            (root / "test" / f"{100 + i}.txt").write_text(_book(i, 400))
    (root / "train" / "999.txt").write_text("Train text must not be used. " * 50)
    return root


BYTES = ByteTokenizer()
SAMPLE = parse_babi_text(
    "1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Mary travelled to the office.\n"
    "4 Where is Mary? \toffice\t3\n"
)[0]


def test_parse_length():
    # decimal, as upstream data/create_tasks.py: [0, 1000, 2000, 4000, ..., 512000, 1_000_000] - 300
    assert parse_length("0k") == 0 and parse_length("1k") == 1000 and parse_length("4k") == 4000
    assert parse_length("512k") == 512_000 and parse_length("1M") == 10**6 and parse_length("10M") == 10**7
    assert parse_length("1m") == 10**6 and parse_length(700) == 700
    assert context_tokens("1k") == 700 and context_tokens("4k") == 3700 and context_tokens("0k") == 0
    for bad in ("3k", "1G", "", "k", "-1k"):
        with pytest.raises(UserError, match="length"):
            parse_length(bad)


def test_split_sentences():
    text = (
        'Mr. Smith came home. He slept! Did he sleep well? "Yes," she said. "Go." Then J. R. Jones '
        "arrived... Everyone waited. it was late. The end"
    )
    assert split_sentences(text) == [
        "Mr.",
        "Smith came home.",
        "He slept!",
        "Did he sleep well?",
        '"Yes," she said.',
        '"Go."',
        "Then J. R. Jones arrived... Everyone waited. it was late.",
        "The end",
    ]
    assert split_sentences("One line\nwrapped here. Two.") == ["One line\nwrapped here.", "Two."]


def test_books_listing(books, tmp_path):
    assert [p.name for p in list_books(books)] == ["100.txt", "101.txt", "102.txt"]
    with pytest.raises(UserError, match="no books"):
        list_books(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        list_books(tmp_path / "nope")


def test_background_sampler_exact_and_from_books(books):
    texts = [p.read_text() for p in list_books(books)]
    s = BackgroundSampler(books, BYTES, random.Random(0))
    for n in (1, 57, 3000):
        sents = s.sample(n)
        assert sum(len(x) for x in sents) == n
        for x in sents[:-1]:
            assert len(x) >= 10
            body = BYTES.decode(x)
            assert body.startswith(" ") and any(body[1:] in t for t in texts)
        assert "Train text" not in "".join(BYTES.decode(x) for x in sents)


def test_background_sampler_refuses_a_book_that_is_not_utf8(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "1.txt").write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 50)
    with pytest.raises(UserError, match=r"1\.txt: not UTF-8 text \(undecodable byte at offset 3\)"):
        BackgroundSampler(tmp_path, BYTES, random.Random(0)).sample(100)


class StubBackground:
    """Known sentences: sentence k is ten copies of token 1000+k."""

    def sample(self, n):
        out = [[1000 + k] * 10 for k in range(n // 10)]
        if n % 10:
            out.append([1000 + len(out)] * (n % 10))
        return out


def test_facts_go_into_sorted_gaps_between_sentences():
    rng = random.Random(3)
    for _ in range(20):
        built = build_sample_tokens(SAMPLE, 1000, BYTES, rng, StubBackground())
        toks = built.input_tokens
        assert len(toks) == 700
        fact_ids = [BYTES.encode(" " + f) for f in SAMPLE["facts"]]
        starts = [a for a, _ in built.fact_spans]
        assert starts == sorted(starts)
        for (a, b), ids in zip(built.fact_spans, fact_ids, strict=True):
            assert toks[a:b] == ids
        # removing the facts leaves the background intact and in order; facts sit on sentence boundaries
        bg = [t for i, t in enumerate(toks) if not any(a <= i < b for a, b in built.fact_spans)]
        assert bg == [t for s in StubBackground().sample(700 - sum(map(len, fact_ids))) for t in s]
        for a, _ in built.fact_spans:
            bg_before = sum(1 for i in range(a) if toks[i] >= 1000)
            assert bg_before % 10 == 0 or bg_before == len(bg), "a fact split a background sentence"
    # the gap of every fact is uniform over len(sentences)+1 positions: both ends are reachable
    firsts = {
        build_sample_tokens(SAMPLE, 1000, BYTES, random.Random(i), StubBackground()).fact_spans[0][0]
        for i in range(200)
    }
    assert 0 in firsts and max(firsts) > 400


def test_exact_length_facts_in_order(books):
    rng = random.Random(1)
    bg = BackgroundSampler(books, BYTES, rng)
    facts = SAMPLE["facts"]
    for length in ("1k", "2k", "4k"):
        built = build_sample_tokens(SAMPLE, length, BYTES, rng, bg)
        assert len(built.input_tokens) == parse_length(length) - 300
        rec = built.record(BYTES)
        pos = -1
        for f in facts:  # all present, in order
            pos = rec["input"].find(f, pos + 1)
            assert pos >= 0
        assert rec["question"] == "Where is Mary? " and rec["target"] == "office"


def test_zero_k_is_facts_only():
    rec = build_sample(SAMPLE, "0k", BYTES, random.Random(0))
    assert rec["input"] == " ".join(SAMPLE["facts"])
    built = build_sample_tokens(SAMPLE, "0k", BYTES, random.Random(0))
    assert len(built.input_tokens) == sum(len(f) + 1 for f in SAMPLE["facts"])


def test_build_dataset_reproducible(books):
    a = build_dataset("qa2", "1k", 4, books, BYTES, seed=5)
    assert a == build_dataset("qa2", "1k", 4, books, BYTES, seed=5)
    assert a != build_dataset("qa2", "1k", 4, books, BYTES, seed=6)
    assert len(a) == 4 and all(set(r) == {"input", "question", "target"} for r in a)
    assert all(r["question"].endswith("? ") and r["target"] in TASK_LABELS["qa2"] for r in a)
    assert all(len(BYTES.encode(r["input"])) <= 700 for r in a)
    z = build_dataset("qa1", "0k", 3, None, BYTES, seed=0)  # 0k needs no books
    for r in z:  # facts only: every sentence is a bAbI qa1 move
        assert all(
            sent.split(" ")[0] in ("John", "Mary", "Sandra", "Daniel") for sent in r["input"].split(". ")
        )


def test_build_dataset_from_babi_file_and_errors(books, tmp_path):
    p = write_task_file(tmp_path, "qa1", 2, 0)
    recs = build_dataset("qa3", "0k", 10, None, BYTES, seed=0, babi_path=p)  # any task name with a file
    assert len(recs) == 10
    with pytest.raises(UserError, match="only 10 questions"):
        build_dataset("qa1", "0k", 11, None, BYTES, seed=0, babi_path=p)
    with pytest.raises(UserError, match="qa6"):
        build_dataset("qa6", "0k", 1, None, BYTES, seed=0)
    with pytest.raises(UserError, match="qa21"):
        build_dataset("qa21", "0k", 1, None, BYTES, seed=0)
    with pytest.raises(UserError, match="length"):
        build_dataset("qa1", "3k", 1, books, BYTES, seed=0)
    with pytest.raises(UserError, match="books directory"):
        build_dataset("qa1", "1k", 1, None, BYTES, seed=0)
    with pytest.raises(UserError, match="more than the"):
        build_sample_tokens(
            {"facts": ["x" * 800], "question": "q", "answer": "a"},
            "1k",
            BYTES,
            random.Random(0),
            StubBackground(),
        )


# ------------------------------------------------------------------------------------------------------------
# Released-data readers
# ------------------------------------------------------------------------------------------------------------

RECS = [
    {"input": "Mary went to the office.", "question": "Where is Mary? ", "target": "office"},
    {"input": "John went to the garden.", "question": "Where is John? ", "target": "garden"},
]


def test_read_babilong_json_and_dir(tmp_path):
    p = write_babilong_json(tmp_path / "data" / "qa1" / "4k.json", RECS)
    assert read_babilong_json(p) == RECS
    assert load_babilong_dir(tmp_path, "qa1", "4k") == RECS
    jl = tmp_path / "lines.json"
    jl.write_text("\n".join(json.dumps(r) for r in RECS) + "\n")
    assert read_babilong_json(jl) == RECS
    with pytest.raises(UserError, match="no BABILong data for qa2 at 4k"):
        load_babilong_dir(tmp_path, "qa2", "4k")
    with pytest.raises(UserError, match="qa0"):
        load_babilong_dir(tmp_path, "qa0", "4k")


@pytest.mark.parametrize(
    "content,needle",
    [
        (json.dumps([RECS[0], {"input": "x", "question": "q"}]), "record 1: missing field 'target'"),
        (json.dumps([RECS[0], RECS[1], "oops"]), "record 2: expected an object"),
        (
            json.dumps([{"input": 1, "question": "q", "target": "t"}]),
            "record 0: field 'input' must be a string",
        ),
        (json.dumps({"records": RECS}), "expected a JSON list"),
        ('[{"input": "x",', "not valid JSON"),
    ],
)
def test_read_babilong_json_errors(tmp_path, content, needle):
    p = tmp_path / "1k.json"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        read_babilong_json(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_parquet(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "4k"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(RECS[:1]), d / "qa1-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(RECS[1:]), d / "qa1-00001-of-00002.parquet")
    assert read_babilong_parquet(d / "qa1-00000-of-00002.parquet") == RECS[:1]
    assert load_babilong_dir(tmp_path, "qa1", "4k") == RECS  # shards concatenated in order
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": "x", "question": "q"}]), bad)
    with pytest.raises(UserError, match="bad.parquet: missing column 'target'"):
        read_babilong_parquet(bad)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # simulate pyarrow not installed
    with pytest.raises(UserError, match="needs pyarrow"):
        read_babilong_parquet(bad)


# ------------------------------------------------------------------------------------------------------------
# Real GPT-2 BPE (the tokenizer BABILong measures lengths with)
# ------------------------------------------------------------------------------------------------------------

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    path = os.environ.get("MEMLM_GPT2_TIKTOKEN")
    if not path:
        d = tmp_path_factory.mktemp("whisper")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(d),
                "openai-whisper==20250625",
            ],
            capture_output=True,
            timeout=300,
        )
        sdists = list(d.glob("openai_whisper-*.tar.gz")) + list(d.glob("openai-whisper-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            pytest.skip("openai-whisper sdist (GPT-2 tiktoken asset) not downloadable")
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            path = d / "gpt2.tiktoken"
            path.write_bytes(tar.extractfile(member).read())
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding(
        "gpt2-test", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )

    class GPT2:
        def encode(self, text):
            return enc.encode_ordinary(text)

        def decode(self, ids):
            return enc.decode(ids)

    return GPT2()


@pytest.mark.integration
def test_gpt2_exact_length(gpt2, books):
    assert gpt2.encode("Hello world, Mary travelled to the office.") == [
        15496,
        995,
        11,
        5335,
        21650,
        284,
        262,
        2607,
        13,
    ]
    rng = random.Random(0)
    bg = BackgroundSampler(books, gpt2, rng)
    for length in ("1k", "2k"):
        built = build_sample_tokens(SAMPLE, length, gpt2, rng, bg)
        assert len(built.input_tokens) == parse_length(length) - 300
        for (a, b), f in zip(built.fact_spans, SAMPLE["facts"], strict=True):
            assert built.input_tokens[a:b] == gpt2.encode(" " + f)
        text = built.record(gpt2)["input"]
        assert [text.find(f) >= 0 for f in SAMPLE["facts"]] == [True] * 3
        # decode+strip and re-encode can only differ by boundary merges (as upstream's released data)
        assert abs(len(gpt2.encode(text)) - len(built.input_tokens)) <= 8
    recs = build_dataset("qa1", "1k", 3, books, gpt2, seed=0)
    assert recs == build_dataset("qa1", "1k", 3, books, gpt2, seed=0)


def test_fact_count_filter_matches_upstream():
    """create_tasks: max_n_facts = (L - 300) // 8; get_dataset_df keeps rows (facts + question) <= max_n_facts."""
    from memlm.eval.babilong_data import _fits

    length = 300 + 8 * 3  # 24 context tokens, max_n_facts 3: at most 2 facts
    two = {"facts": ["a.", "b."]}
    assert _fits(two, length, BYTES)
    three = {"facts": ["a.", "b.", "c."]}  # 9 byte tokens: the token budget allows it, the count does not
    assert sum(len(BYTES.encode(" " + f)) for f in three["facts"]) <= 24
    assert not _fits(three, length, BYTES)
