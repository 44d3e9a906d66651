"""Bad checkpoints -> one-line UserError naming the tensor or key (exit code 2); the output is untouched."""

import json
import os
import shutil

import numpy as np
import pytest

from memlm.convert import runs
from memlm.convert import safetensors_io as st
from memlm.errors import UserError
from tests.convert.common import make_run
from tests.core.cli_utils import run_memlm, snapshot

pytestmark = pytest.mark.integration

MODEL = {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48,
         "max_seq_len": 64, "dtype": "float32", "remat": "none"}
ARGS = ["data.source=synthetic", "data.segment_len=16", "data.n_segments=2"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A clean Llama checkpoint dir (written by memlm's own exporter: no torch needed)."""
    base = tmp_path_factory.mktemp("bad")
    out = str(base / "hf")
    runs.export_run(make_run(str(base / "run"), MODEL), "hf", out)
    os.remove(os.path.join(out, "memlm.yaml"))  # a plain HF dir
    return out


def _copy(hf_dir, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(hf_dir, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    t, meta = st.read(str(d / "model.safetensors"))
    t = {k: np.array(v) for k, v in t.items()}
    fn(t)
    st.write(str(d / "model.safetensors"), t, meta)


def _assert_import_fails(src, tmp_path, *needles, overrides=()):
    """The import raises a UserError with every needle; an existing --force target and the parent dir are
    left exactly as they were."""
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    (target / "config.yaml").write_text("model: {}\n")  # a previous run dir: --force may replace it, a failure not
    (target / "keep.txt").write_text("precious")
    before, parent = snapshot(str(target)), sorted(os.listdir(tmp_path))
    with pytest.raises(UserError) as e:
        runs.import_hf(str(src), str(target), [*ARGS, *overrides], force=True)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert snapshot(str(target)) == before and sorted(os.listdir(tmp_path)) == parent
    return msg


def test_clean_dir_imports(hf_dir, tmp_path):
    runs.import_hf(hf_dir, str(tmp_path / "ok"), ARGS)
    assert sorted(os.listdir(tmp_path)) == ["ok"]


def test_force_does_not_replace_a_plain_file(hf_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(UserError, match="a file that is not a previous run dir; --force does not replace it"):
        runs.import_hf(hf_dir, str(notes), ARGS, force=True)
    assert notes.read_text() == "precious" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_unsupported_architecture(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, model_type="bert", architectures=["BertForMaskedLM"])
    _assert_import_fails(d, tmp_path, "config.json", "model_type 'bert'", "BertForMaskedLM")


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_parameters.rope_type"),
    ("num_attention_heads", "four", "num_attention_heads must be a positive integer"),
])
def test_unsupported_config_values(hf_dir, tmp_path, key, value, needle):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, **{key: value})
    _assert_import_fails(d, tmp_path, needle)


def test_missing_tensor(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_import_fails(d, tmp_path, "missing tensor model.layers.1.mlp.up_proj.weight")


def test_mismatched_shape(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((16, 32), np.float32)}))
    _assert_import_fails(d, tmp_path, "model.layers.0.self_attn.q_proj.weight", "[16, 32]", "[32, 32]")


@pytest.mark.parametrize("changes, needles", [
    ({"hidden_size": 48}, ["model.embed_tokens.weight", "[300, 32]", "config.json implies [300, 48]"]),
    ({"num_hidden_layers": 1}, ["unexpected tensor model.layers.1."]),
    ({"num_hidden_layers": 3}, ["missing tensor model.layers.2."]),
    ({"vocab_size": 320}, ["model.embed_tokens.weight", "[320, 32]"]),
    ({"tie_word_embeddings": True}, ["lm_head.weight differs from model.embed_tokens.weight"]),
])
def test_config_disagrees_with_weights(hf_dir, tmp_path, changes, needles):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, **changes)
    _assert_import_fails(d, tmp_path, *needles)


def test_override_contradicting_the_weights(hf_dir, tmp_path):
    _assert_import_fails(hf_dir, tmp_path, "model.n_layers: 3 contradicts", overrides=["model.n_layers=3"])
    _assert_import_fails(hf_dir, tmp_path, "model.unknown_key", "unknown key", overrides=["model.unknown_key=1"])


def test_damaged_files(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    _assert_import_fails(d, tmp_path, "model.safetensors", "file truncated?")
    (d / "config.json").write_text("{not json")
    _assert_import_fails(d, tmp_path, "config.json", "not readable JSON")
    os.remove(d / "config.json")
    _assert_import_fails(d, tmp_path, "config.json: not found")
    shutil.copy(hf_dir + "/config.json", d / "config.json")
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"x")
    _assert_import_fails(d, tmp_path, "pytorch_model.bin", "safe_serialization=True")


def test_cli_exit_code_and_one_line(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.norm.weight"))
    out = tmp_path / "run"
    r = run_memlm("import", "hf", str(d), "--out", str(out), *ARGS)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("memlm: error:")]
    assert len(lines) == 1 and "missing tensor model.norm.weight" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    # an existing run dir is refused without --force, before anything is read
    out.mkdir()
    r = run_memlm("import", "hf", hf_dir, "--out", str(out), *ARGS)
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert os.listdir(out) == []


def test_a_damaged_tokenizer_is_named_as_the_users_file(hf_dir, tmp_path):
    """The import loads the tokenizer from a scratch copy; the error names the source's file, not that copy."""
    d = _copy(hf_dir, tmp_path)
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    msg = _assert_import_fails(d, tmp_path, str(d / "tokenizer.model"))
    assert ".tmp-" not in msg
