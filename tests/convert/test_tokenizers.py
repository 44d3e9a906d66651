"""Tokenizer conversion: HF byte-level BPE files <-> tiktoken ranks (same ids as the HF tokenizer), and the
tokenizer of an imported checkpoint landing in the run dir (GPT-2 BPE, SentencePiece)."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from memlm.convert import tokenizer as tok_lib
from memlm.data.tokenizers import GPT2_PATTERN, load_tokenizer, train_sentencepiece
from memlm.errors import UserError
from tests.data.textgen import lines_text

pytestmark = pytest.mark.integration

SAMPLES = ["Mary travelled to the office.", "  héllo wörld!! 12345 don't\n\nthe  end ", "ab" * 40, "日本語 ✓"]


def test_byte_alphabet_is_a_printable_bijection():
    a = tok_lib.byte_alphabet()
    assert sorted(a) == list(range(256)) and len(set(a.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in a.values())
    assert a[ord("A")] == "A" and a[ord(" ")] == "Ġ" and a[ord("\n")] == "Ċ"  # GPT-2's well-known stand-ins


def _train_bpe(path, vocab_size=420):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(lines_text(0, 300).splitlines() + SAMPLES, trainer)
    tok.save(str(path))
    return tok


def _tiktoken(ranks):
    import tiktoken

    return tiktoken.Encoding(name="t", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_small_bpe_both_ways(tmp_path):
    hf = _train_bpe(tmp_path / "tokenizer.json")
    ranks = tok_lib.gpt2_ranks_from_hf([str(tmp_path / "tokenizer.json")], expect=None)
    enc = _tiktoken(ranks)
    for text in SAMPLES + lines_text(1, 5).splitlines():
        assert enc.encode_ordinary(text) == hf.encode(text).ids, text
    # and back: tiktoken ranks file -> vocab.json + merges.txt -> the same ranks and the same ids
    (tmp_path / "ranks.tiktoken").write_text(tok_lib.tiktoken_text(ranks))
    files = tok_lib.hf_files_from_tiktoken(str(tmp_path / "ranks.tiktoken"))
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    again = tok_lib.gpt2_ranks_from_hf([str(out / "vocab.json"), str(out / "merges.txt")], expect=None)
    assert again == ranks
    from tokenizers import Tokenizer, models, pre_tokenizers

    rebuilt = Tokenizer(models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt")))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in SAMPLES:
        assert rebuilt.encode(text).ids == hf.encode(text).ids, text


def test_bad_tokenizer_files(tmp_path):
    _train_bpe(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match=r"tokenizer.json: 420 BPE tokens.*--no-tokenizer"):
        tok_lib.gpt2_ranks_from_hf([str(tmp_path / "tokenizer.json")])  # not the GPT-2 vocabulary
    j = json.loads((tmp_path / "tokenizer.json").read_text())
    j["model"]["merges"][0], j["model"]["merges"][1] = j["model"]["merges"][1], j["model"]["merges"][0]
    (tmp_path / "swapped.json").write_text(json.dumps(j))
    with pytest.raises(UserError, match="swapped.json: merge 0 .* disagree"):
        tok_lib.gpt2_ranks_from_hf([str(tmp_path / "swapped.json")], expect=None)
    j["model"]["type"] = "WordPiece"
    (tmp_path / "wp.json").write_text(json.dumps(j))
    with pytest.raises(UserError, match="wp.json: model.type is 'WordPiece'"):
        tok_lib.gpt2_ranks_from_hf([str(tmp_path / "wp.json")], expect=None)


@pytest.fixture(scope="module")
def gpt2_tiktoken(tmp_path_factory):
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


def test_gpt2_checkpoint_brings_its_tokenizer(tmp_path, gpt2_tiktoken):
    """A GPT-2 dir whose tokenizer transformers wrote -> run dir with memlm's gpt2 tokenizer, same ids."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from memlm import config as config_lib
    from memlm.convert import runs
    from tests.convert.common import FAST, tiny_gpt2

    src = tmp_path / "hf"
    tiny_gpt2(str(src), vocab=50257)
    files = tok_lib.hf_files_from_tiktoken(gpt2_tiktoken)
    (tmp_path / "tok").mkdir()
    for name, text in files.items():
        (tmp_path / "tok" / name).write_text(text, encoding="utf-8")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf_tok.encode("Hello world") == [15496, 995]
    hf_tok.save_pretrained(str(src))  # transformers writes tokenizer.json, as hub checkpoints have
    assert (src / "tokenizer.json").exists()
    run = tmp_path / "run"
    runs.import_hf(str(src), str(run), FAST)
    cfg = config_lib.read_run_config(str(run))
    assert cfg.data.tokenizer == "gpt2"
    assert cfg.data.tokenizer_path == str(run / "tokenizer" / "gpt2.tiktoken")
    assert open(cfg.data.tokenizer_path).read() == open(gpt2_tiktoken).read()
    ours = load_tokenizer("gpt2", cfg.data.tokenizer_path)
    for text in SAMPLES:
        assert ours.encode(text) == hf_tok.encode(text), text
    assert ours.encode("Hello world, Mary travelled to the office.") == [15496, 995, 11, 5335, 21650, 284, 262,
                                                                         2607, 13]
    # export: the run's tokenizer goes out as vocab.json/merges.txt that transformers loads
    out = tmp_path / "export"
    runs.export_run(str(run), "hf", str(out))
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50256
    back = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in SAMPLES:
        assert back.encode(text) == hf_tok.encode(text), text


def test_llama_checkpoint_brings_its_sentencepiece_model(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memlm import config as config_lib
    from memlm.convert import runs
    from tests.convert.common import FAST, tiny_llama

    src = tmp_path / "hf"
    tiny_llama(str(src), vocab=300)
    (tmp_path / "text.txt").write_text(lines_text(3, 300))
    model = train_sentencepiece([str(tmp_path / "text.txt")], str(tmp_path / "sp"), 120)
    (src / "tokenizer.model").write_bytes(open(model, "rb").read())
    run = tmp_path / "run"
    runs.import_hf(str(src), str(run), FAST)
    cfg = config_lib.read_run_config(str(run))
    assert (cfg.data.tokenizer, cfg.data.tokenizer_path) == ("sentencepiece", str(run / "tokenizer" /
                                                                                  "tokenizer.model"))
    assert (run / "tokenizer" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    ids = load_tokenizer("sentencepiece", cfg.data.tokenizer_path).encode("Mary went to the garden.")
    assert ids and max(ids) < 120
    # --no-tokenizer leaves the data config alone
    bare = tmp_path / "bare"
    runs.import_hf(str(src), str(bare), FAST, no_tokenizer=True)
    assert config_lib.read_run_config(str(bare)).data.tokenizer == "bytes"
    assert not (bare / "tokenizer").exists()
    out = tmp_path / "export"
    runs.export_run(str(run), "hf", str(out))
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
