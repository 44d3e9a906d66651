"""Helpers for the conversion tests: tiny random Hugging Face models (made locally, no downloads), memlm runs."""

from __future__ import annotations

import os

import jax
import numpy as np

from memlm import config as config_lib
from memlm.convert import flat as flat_lib
from memlm.convert import runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# memlm overrides for small, fast, exact (float32) imported runs
FAST = ["model.dtype=float32", "model.remat=none", "data.source=synthetic", "data.segment_len=16",
        "data.n_segments=2", "data.synthetic_docs=16", "train.batch_size=2", "train.progress=false",
        "train.async_checkpoint=false"]


def _randomize(model, std: float = 0.2, seed: int = 0) -> None:
    """Every parameter ~ N(0, std) (norm scales and biases too), so a wrong mapping cannot hide."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_llama(path: str, vocab: int = 300, tie: bool = False, seed: int = 0, **kw) -> str:
    """A 2-layer grouped-query Llama with random weights saved as safetensors + config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **kw)
    model = LlamaForCausalLM(cfg)
    _randomize(model, seed=seed)
    model.save_pretrained(path)
    return path


def tiny_gpt2(path: str, vocab: int = 300, seed: int = 0) -> str:
    """A 2-layer GPT-2 (tied embeddings, biases, learned positions) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    _randomize(model, seed=seed)
    model.save_pretrained(path)
    return path


def torch_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    """float32 logits of the transformers model saved at `path` (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def run_params(run_dir: str) -> dict[str, np.ndarray]:
    """{flat name: array} of the latest checkpoint of a run dir."""
    _, _, params = runs.load_run_params(run_dir, None)
    return flat_lib.to_flat(params)


def make_run(run_dir: str, model: dict, seed: int = 0) -> str:
    """A memlm run dir with freshly initialised params at step 0 (as `memlm train` would start it)."""
    from memlm.train import setup as setup_lib

    raw = {"run": {"dir": run_dir, "seed": seed}, "model": model,
           "data": {"source": "synthetic", "segment_len": 16, "n_segments": 2, "synthetic_docs": 16},
           "train": {"batch_size": 2, "progress": False}}
    cfg = config_lib.from_dict(raw)
    setup = runs._setup(cfg)
    params = setup_lib.init_params(setup, seed)
    # perturb every parameter so norm scales (ones) and biases (zeros) carry distinct values too
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    from memlm.data.pipeline import get_tokenizer

    runs._write_run(setup, params, run_dir, get_tokenizer(cfg.data), {})
    return run_dir
