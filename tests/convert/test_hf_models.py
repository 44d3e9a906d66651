"""Tiny random Llama and GPT-2 models made with transformers: import -> same logits as PyTorch; export back
to a Hugging Face dir -> transformers loads the same weights; import again -> identical memlm parameters."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import memlm  # noqa: E402
from memlm.convert import runs  # noqa: E402
from memlm.convert import safetensors_io as st  # noqa: E402
from tests.convert.common import FAST, run_params, tiny_gpt2, tiny_llama, torch_logits  # noqa: E402

pytestmark = pytest.mark.integration

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_export_round_trip(tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    src = MAKERS[arch](str(tmp_path / "hf"))
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    ref = torch_logits(src, tokens)

    run = str(tmp_path / "run")
    out = runs.import_hf(src, run, FAST)
    assert (out["arch"], out["model.kind"], out["step"]) == (arch, "baseline", 0)
    lm = memlm.load(run)
    assert (lm.config.model.arch, lm.config.model.vocab_size, lm.config.model.padded_vocab) == (arch, 300, 384)
    ours = lm.logits(tokens)
    assert ours.shape == ref.shape == (2, 40, 300)
    diff = float(np.abs(ours - ref).max())
    assert diff < 1e-4, diff

    exported = str(tmp_path / "exported")
    runs.export_run(run, "hf", exported)
    assert {"config.json", "model.safetensors", "memlm.yaml", "README.md"} <= set(os.listdir(exported))
    assert "memory.safetensors" not in os.listdir(exported)  # a baseline has no memory parameters
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    np.testing.assert_array_equal(torch_logits(exported, tokens), ref)

    again = str(tmp_path / "again")
    runs.import_hf(exported, again, ["data.source=synthetic"])
    p1, p2 = run_params(run), run_params(again)
    assert sorted(p1) == sorted(p2)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_tied_llama_and_bfloat16_export(tmp_path):
    """Tied Llama embeddings; a bfloat16 export loads in transformers as bfloat16 with rounded weights."""
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_llama(str(tmp_path / "hf"), vocab=260, tie=True, rope_theta=500.0)
    run = str(tmp_path / "run")
    runs.import_hf(src, run, FAST)
    lm = memlm.load(run)
    assert lm.config.model.tie_embeddings and lm.config.model.rope_theta == 500.0
    tokens = np.random.default_rng(1).integers(0, 260, (1, 33))
    assert float(np.abs(lm.logits(tokens) - torch_logits(src, tokens)).max()) < 1e-4
    exported = str(tmp_path / "bf16")
    runs.export_run(run, "hf", exported, dtype="bfloat16")
    header, _, _ = st.read_header(os.path.join(exported, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert json.load(open(os.path.join(exported, "config.json")))["torch_dtype"] == "bfloat16"
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    for k in a:  # whatever dtype this transformers version loads it in, the values are a's rounded to bf16
        assert torch.equal(a[k].to(torch.bfloat16), b[k].to(torch.bfloat16)), k
        assert torch.equal(b[k].float(), b[k].to(torch.bfloat16).float()), k
