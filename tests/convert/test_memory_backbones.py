"""Memory kinds that re-lay the decoder out take an imported backbone too (issue #8: "as the backbone of any
memory model kind"). memory_layers turns the FFN of its memory layers into a product-key memory, so an
imported Llama / GPT-2 keeps every tensor except those FFNs. Check: with the memory's output projection zeroed,
the imported model's logits equal the PyTorch model whose FFN in that layer is zeroed (max abs diff < 1e-4),
which fails if any layer, norm, or position table landed in the wrong place."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import memlm  # noqa: E402
from memlm.convert import runs  # noqa: E402
from memlm.errors import UserError  # noqa: E402
from tests.convert.common import FAST, run_params, tiny_gpt2, tiny_llama, torch_logits  # noqa: E402
from tests.core.cli_utils import run_memlm  # noqa: E402

pytestmark = pytest.mark.integration

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
MEMORY = ["model.kind=memory_layers", "model.memory_layers.layers=[1]", "model.memory_layers.num_values=64",
          "model.memory_layers.k_dim=8", "model.memory_layers.top_k=4", "model.memory_layers.heads=2"]


def _zero_ffn(src: str, dst: str, arch: str, layer: int) -> None:
    """Save a copy of the HF model at `src` whose FFN in `layer` outputs exactly 0."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        if arch == "llama":
            model.model.layers[layer].mlp.down_proj.weight.zero_()
        else:
            model.transformer.h[layer].mlp.c_proj.weight.zero_()
            model.transformer.h[layer].mlp.c_proj.bias.zero_()
    model.save_pretrained(dst)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_layers_on_an_imported_backbone(tmp_path, arch):
    src = MAKERS[arch](str(tmp_path / "hf"))
    _zero_ffn(src, str(tmp_path / "ref"), arch, layer=1)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    ref = torch_logits(str(tmp_path / "ref"), tokens)

    run = str(tmp_path / "run")
    out = runs.import_hf(src, run, [*FAST, *MEMORY])
    assert (out["model.kind"], out["arch"]) == ("memory_layers", arch)
    lm = memlm.load(run)
    live = lm.logits(tokens)
    assert np.abs(live - ref).max() > 1e-3  # the fresh memory really contributes (the check below can fail)

    def silence(path, x):  # the memory's output projection -> the memory layer adds exactly 0
        names = [str(getattr(p, "key", p)) for p in path]
        return jnp.zeros_like(x) if "memory" in names and "w2" in names else x

    lm._params = jax.tree_util.tree_map_with_path(silence, lm._params)
    diff = float(np.abs(lm.logits(tokens) - ref).max())
    assert diff < 1e-4, diff


def test_memory_layers_import_then_train_one_step(tmp_path):
    src = tiny_llama(str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    runs.import_hf(src, run, [*FAST, *MEMORY, "train.steps=1", "train.warmup_steps=0", "train.lr=1e-2",
                                      "train.batch_size=8"])
    imported = run_params(run)
    r = run_memlm("train", f"{run}/config.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    tuned = run_params(run)
    for name in ("decoder.blocks.0.attn.wq.kernel", "decoder.memory_blocks.0.attn.wq.kernel", "values"):
        assert np.abs(tuned[name] - imported[name]).max() > 1e-5, name


TITANS = ["model.kind=titans", "model.titans.chunk_size=8", "model.titans.memory_heads=2", "model.titans.window=8",
          "data.segment_len=32"]


@pytest.mark.parametrize("arch,variant", [("llama", "mac"), ("gpt2", "mac"), ("gpt2", "mag")])
def test_titans_on_an_imported_backbone(tmp_path, arch, variant):
    """Titans' blocks take the backbone's attention, norms, FFN (and GPT-2's wpe, at segment-local positions).
    With no memory layers, no persistent tokens and a window covering the segment, one segment of Titans is
    exactly the imported model; with memory on, the (fresh) memory changes the logits."""
    src = MAKERS[arch](str(tmp_path / "hf"))
    tokens = np.random.default_rng(1).integers(0, 300, (2, 32))
    ref = torch_logits(src, tokens)
    plain = str(tmp_path / "plain")
    runs.import_hf(src, plain, [*FAST, *TITANS, f"model.titans.variant={variant}", "model.titans.memory_layers=[]",
                                "model.titans.num_persistent=0", "model.titans.window=32"])
    diff = float(np.abs(memlm.load(plain).logits(tokens) - ref).max())
    assert diff < 1e-4, diff

    run = str(tmp_path / "run")
    out = runs.import_hf(src, run, [*FAST, *TITANS, f"model.titans.variant={variant}"])
    assert (out["model.kind"], out["arch"]) == ("titans", arch)
    assert float(np.abs(memlm.load(run).logits(tokens) - ref).max()) > 1e-3
    p_run, p_plain = run_params(run), run_params(plain)
    for name in ("decoder.embedding", "decoder.final_norm.scale"):
        np.testing.assert_array_equal(p_run[name], p_plain[name])


# ---- export back to the Hugging Face layout -------------------------------------------------------------------
def _same_params(a: dict, b: dict, vocab: int) -> None:
    """Identical flat parameters; vocab padding (dropped by an HF export, zeroed by an import) is not compared."""
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        if k in ("decoder.embedding", "decoder.lm_head.kernel"):
            axis = 0 if k == "decoder.embedding" else 1
            x, y = np.take(x, range(vocab), axis=axis), np.take(y, range(vocab), axis=axis)
        np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_layers_export_hf(tmp_path, arch):
    """memory_layers -> hf: the memory layers' FFN are zeros, so transformers' logits equal the memlm model with
    the memory's output zeroed; the memory goes to memory.safetensors and `memlm import hf` restores the run."""
    from memlm.convert import safetensors_io as st

    src = MAKERS[arch](str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    runs.import_hf(src, run, [*FAST, *MEMORY])
    out = str(tmp_path / "export")
    runs.export_run(run, "hf", out)
    backbone, _ = st.read(f"{out}/model.safetensors")
    ffn = "model.layers.1.mlp.down_proj.weight" if arch == "llama" else "transformer.h.1.mlp.c_proj.weight"
    assert not backbone[ffn].any() and backbone[ffn.replace(".1.", ".0.")].any()
    memory, _ = st.read(f"{out}/memory.safetensors")
    assert "values" in memory and not any(".mlp." in n for n in memory)
    assert "product-key memory replaces their FFN" in open(f"{out}/README.md").read()

    tokens = np.random.default_rng(2).integers(0, 300, (2, 40))
    lm = memlm.load(run)

    def silence(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        return jnp.zeros_like(x) if "memory" in names and "w2" in names else x

    lm._params = jax.tree_util.tree_map_with_path(silence, lm._params)
    diff = float(np.abs(lm.logits(tokens) - torch_logits(out, tokens)).max())
    assert diff < 1e-4, diff

    back = str(tmp_path / "back")
    runs.import_hf(out, back)
    _same_params(run_params(run), run_params(back), 300)
    # a tensor renamed in memory.safetensors is named as that file's, not blamed on the decoder layout
    memory["bogus.tensor"] = memory.pop("values")
    st.write(f"{out}/memory.safetensors", memory, {"format": "memlm", "memlm.kind": "memory_layers"})
    with pytest.raises(UserError, match=r"memory.safetensors: tensor bogus.tensor is not a parameter"):
        runs.import_hf(out, str(tmp_path / "again"))


@pytest.mark.parametrize("arch,variant", [("llama", "mac"), ("gpt2", "mag")])
def test_titans_export_hf(tmp_path, caplog, arch, variant):
    """titans -> hf: every backbone tensor goes back to its own layer (an untrained import exports the source
    model's weights, so transformers gives the source's logits); memory and persistent tokens go to
    memory.safetensors, and `memlm import hf` restores identical parameters."""
    from memlm.convert import safetensors_io as st

    src = MAKERS[arch](str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    runs.import_hf(src, run, [*FAST, *TITANS, f"model.titans.variant={variant}", "model.titans.memory_layers=[1]"])
    out = str(tmp_path / "export")
    runs.export_run(run, "hf", out)
    tokens = np.random.default_rng(3).integers(0, 300, (2, 32))
    assert float(np.abs(torch_logits(out, tokens) - torch_logits(src, tokens)).max()) < 1e-5
    memory, _ = st.read(f"{out}/memory.safetensors")
    assert memory and all(".mlp." not in n and ".attn." not in n for n in memory)
    assert "full causal attention" in open(f"{out}/README.md").read()
    back = str(tmp_path / "back")
    runs.import_hf(out, back)
    _same_params(run_params(run), run_params(back), 300)
    if variant != "mac":
        return
    # Options that change only how a step runs keep the exported memory; one that changes the memory's function
    # starts it fresh, with a warning naming the key. The exported memory is shifted by 1 so that it differs from
    # a fresh init with the same seed.
    memory = {n: (a + 1).astype(a.dtype) for n, a in memory.items()}
    st.write(f"{out}/memory.safetensors", memory)
    same, fresh = str(tmp_path / "schedule_only"), str(tmp_path / "fresh")
    runs.import_hf(out, same, ["model.titans.chunk_remat=false", "model.attention_q_block=8", "model.remat=full"])
    with caplog.at_level(logging.WARNING, logger="memlm.convert.runs"):
        runs.import_hf(out, fresh, ["model.titans.max_lr=0.05"])
    assert any("model.titans.max_lr" in r.getMessage() and "starts fresh" in r.getMessage()
               for r in caplog.records), caplog.text
    orig, p_same, p_fresh = run_params(run), run_params(same), run_params(fresh)
    shifted = [n for n in orig if "memory" in n]
    assert shifted and set(shifted) <= set(p_same) and set(shifted) <= set(p_fresh)
    for n in shifted:
        np.testing.assert_allclose(p_same[n], orig[n] + 1, rtol=1e-6, atol=1e-6, err_msg=n)
        np.testing.assert_array_equal(p_fresh[n], orig[n], err_msg=n)  # fresh: the seed's init, not the file


def test_landmark_on_an_imported_gpt2(tmp_path):
    """Landmark takes GPT-2 too: learned positions restart at every segment (memlm/memory/landmark.py). The
    first block of a stream attends to nothing earlier and its landmark comes after it, so its logits are
    GPT-2's on those tokens; later blocks also see landmarks, so they differ. Then one CLI training step."""
    src = tiny_gpt2(str(tmp_path / "hf"))
    run = str(tmp_path / "run")
    out = runs.import_hf(src, run, [*FAST, "model.kind=landmark", "model.landmark.block_size=8",
                                    "model.landmark.top_k=2", "model.landmark.cache_blocks=4", "train.steps=1",
                                    "train.warmup_steps=0", "train.batch_size=8"])
    assert (out["model.kind"], out["arch"]) == ("landmark", "gpt2")
    tokens = np.random.default_rng(4).integers(0, 300, (2, 16))
    ref = torch_logits(src, tokens)
    live = memlm.load(run).logits(tokens)
    assert float(np.abs(live[:, :8] - ref[:, :8]).max()) < 1e-4
    assert float(np.abs(live[:, 8:] - ref[:, 8:]).max()) > 1e-3
    r = run_memlm("train", f"{run}/config.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
