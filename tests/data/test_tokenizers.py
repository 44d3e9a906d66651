"""Tokenizers (bytes, SentencePiece, GPT-2 BPE) and `memlm data train-tokenizer`; no tensorflow here."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from memlm.data import tokenizers as toks
from memlm.data.cli import add_data_commands
from memlm.errors import UserError
from tests.data.textgen import lines_text, write_text_dir

pytestmark = pytest.mark.unit

HELLO = "Hello world, Mary travelled to the office."
HELLO_GPT2 = [15496, 995, 11, 5335, 21650, 284, 262, 2607, 13]


# ----------------------------------------------------------------------------- bytes


def test_byte_tokenizer_layout_and_roundtrip():
    tok = toks.ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.unk_id) == (259, 0, 1, 2)
    text = "Emma — naïve café 日本\n"
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]  # the seqio.ByteVocabulary layout
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_array(text), np.array(ids, dtype=np.int32))
    # pad/eos/unk are skipped wherever they occur; numpy input works.
    assert tok.decode(np.array([0, 1, 2] + ids[:5] + [1, 0])) == text[:5]
    # A cut multi-byte character decodes with a replacement character instead of failing.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"


# ----------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    write_text_dir(root / "text", n_docs=3, n_lines=200)
    return toks.train_sentencepiece(str(root / "text"), str(root / "out" / "tok"), 120)


def test_train_sentencepiece_ids_and_roundtrip(spm_model):
    assert spm_model.endswith("tok.model") and os.path.isfile(spm_model)
    tok = toks.load_tokenizer("sentencepiece", spm_model)
    assert isinstance(tok, toks.SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.unk_id) == (120, 0, 1, 2)
    assert tok._sp.bos_id() == -1  # no bos
    line = "Mary went to the garden and picked up the apple."
    ids = tok.encode(line)
    assert ids and all(3 <= i < 120 for i in ids)
    assert tok.decode(ids) == line
    assert tok.decode([1, 0] + ids + [1, 0, 0]) == line
    assert tok.fingerprint.startswith("sentencepiece:tok:") and len(tok.fingerprint) > len(tok.name)


def test_train_sentencepiece_bpe_and_training_reads_only_train_split(tmp_path):
    """A directory with split subdirectories trains on train/ only; the same text as files leaks."""
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "validation").mkdir(parents=True)
    (tmp_path / "c" / "train" / "a.txt").write_text(lines_text(1, 300), encoding="utf-8")
    (tmp_path / "c" / "validation" / "b.txt").write_text("zzyzxq zzyzxq zzyzxq\n" * 500, encoding="utf-8")
    model = toks.train_sentencepiece(str(tmp_path / "c"), str(tmp_path / "bpe"), 150, model_type="bpe")
    tok = toks.SentencePieceTokenizer(model)
    pieces = {tok._sp.id_to_piece(i) for i in range(tok.vocab_size)}
    assert "▁zzyzxq" not in pieces
    files = [tmp_path / "c" / "train" / "a.txt", tmp_path / "c" / "validation" / "b.txt"]
    leaky = toks.SentencePieceTokenizer(toks.train_sentencepiece(files, str(tmp_path / "leak"), 150, "bpe"))
    assert "▁zzyzxq" in {leaky._sp.id_to_piece(i) for i in range(leaky.vocab_size)}


def test_train_sentencepiece_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        toks.train_sentencepiece(str(tmp_path / "empty"), str(tmp_path / "x"), 50)
    (tmp_path / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(UserError, match="blank.txt"):
        toks.train_sentencepiece([str(tmp_path / "blank.txt")], str(tmp_path / "x"), 50)
    (tmp_path / "small.txt").write_text("ab ba\n" * 20, encoding="utf-8")
    with pytest.raises(UserError, match="--vocab-size"):
        toks.train_sentencepiece(str(tmp_path / "small.txt"), str(tmp_path / "x"), 5000)
    with pytest.raises(UserError, match="--model-type"):
        toks.train_sentencepiece(str(tmp_path / "small.txt"), str(tmp_path / "x"), 50, model_type="word2")
    with pytest.raises(UserError, match="nope"):
        toks.train_sentencepiece(str(tmp_path / "nope"), str(tmp_path / "x"), 50)


# ----------------------------------------------------------------------------- load_tokenizer errors


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2"])
def test_load_tokenizer_file_errors_name_the_file(tmp_path, kind):
    missing = tmp_path / "missing.bin"
    with pytest.raises(UserError, match="missing.bin") as e:
        toks.load_tokenizer(kind, str(missing))
    assert "\n" not in str(e.value)
    garbled = tmp_path / "garbled.bin"
    garbled.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="garbled.bin") as e:
        toks.load_tokenizer(kind, str(garbled))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="path"):
        toks.load_tokenizer(kind, None)


def test_load_tokenizer_kinds(tmp_path):
    assert isinstance(toks.load_tokenizer("bytes", None), toks.ByteTokenizer)
    with pytest.raises(UserError, match="unknown kind"):
        toks.load_tokenizer("wordpiece", None)
    # A well-formed tiktoken file with the wrong number of ranks is not GPT-2.
    small = tmp_path / "small.tiktoken"
    small.write_text("YQ== 0\nYg== 1\n", encoding="ascii")
    with pytest.raises(UserError, match="small.tiktoken.*50256"):
        toks.load_tokenizer("gpt2", str(small))


# ----------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    """whisper's gpt2.tiktoken: $MEMLM_GPT2_TIKTOKEN, else `pip download` the openai-whisper sdist."""
    env = os.environ.get("MEMLM_GPT2_TIKTOKEN")
    if env and os.path.isfile(env):
        return env
    d = tmp_path_factory.mktemp("whisper")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "openai-whisper==20250625", "-d", str(d), "-q"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot download openai-whisper==20250625 for gpt2.tiktoken: {e}")
    sdists = sorted(d.glob("openai*whisper-20250625.tar.gz"))
    if r.returncode != 0 or not sdists:
        pytest.skip(f"cannot download openai-whisper==20250625 for gpt2.tiktoken: {r.stderr.strip()[-200:]}")
    with tarfile.open(sdists[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        out = d / "gpt2.tiktoken"
        out.write_bytes(tar.extractfile(member).read())
    return str(out)


def test_gpt2_matches_reference_ids(gpt2_path):
    tok = toks.load_tokenizer("gpt2", gpt2_path)
    assert (tok.name, tok.vocab_size, tok.eos_id, tok.pad_id) == ("gpt2", 50257, 50256, 50256)
    assert tok.encode(HELLO) == HELLO_GPT2
    assert tok.decode(HELLO_GPT2) == HELLO
    assert tok.decode(HELLO_GPT2 + [50256, 50256]) == HELLO
    # A literal <|endoftext|> in a document is ordinary text, never the special id.
    ids = tok.encode("a <|endoftext|> b")
    assert 50256 not in ids and tok.decode(ids) == "a <|endoftext|> b"
    text = lines_text(3, 20)
    np.testing.assert_array_equal(tok.encode_array(text), tok.encode(text))
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- CLI, imports


def _parser():
    parser = argparse.ArgumentParser(prog="memlm")
    add_data_commands(parser.add_subparsers(dest="command"))
    return parser


def test_cli_train_tokenizer(tmp_path, capsys):
    write_text_dir(tmp_path / "t", n_docs=2, n_lines=150)
    args = _parser().parse_args(["data", "train-tokenizer", "--input", str(tmp_path / "t"), "--out",
                                 str(tmp_path / "m" / "spm"), "--vocab-size", "90", "--model-type", "bpe"])
    assert args.func(args) == 0
    assert "vocab 90" in capsys.readouterr().out
    assert toks.SentencePieceTokenizer(str(tmp_path / "m" / "spm.model")).vocab_size == 90


@pytest.mark.parametrize("cmd", [["data"], ["data", "fetch-books"], ["data", "train-tokenizer"],
                                 ["data", "stats"]])
def test_cli_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(cmd + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: memlm data" in out and len(out) > 200


def test_light_modules_do_not_import_tensorflow():
    code = (
        "import sys; import memlm.data, memlm.data.batcher, memlm.data.tokenizers, memlm.data.cli, "
        "memlm.data.corpus, memlm.data.books, memlm.data.local_pg19; "
        "heavy = ('tensorflow', 'seqio', 'tensorflow_datasets'); "
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
