"""Hugging Face Llama / GPT-2 checkpoints <-> the memlm backbone (`decoder.*` parameters).

Layouts (torch nn.Linear stores W as [out, in] and computes x W^T; memlm kernels are [in, out]):

  memlm (arch=llama)                      LlamaForCausalLM
  decoder.embedding [Vp, d]               model.embed_tokens.weight [V, d]       (rows >= V are padding)
  decoder.blocks.{i}.attn_norm.scale      model.layers.{i}.input_layernorm.weight
  decoder.blocks.{i}.attn.wq|wk|wv|wo     model.layers.{i}.self_attn.q|k|v|o_proj.weight   (transposed)
  decoder.blocks.{i}.mlp_norm.scale       model.layers.{i}.post_attention_layernorm.weight
  decoder.blocks.{i}.mlp.w1|w3|w2         model.layers.{i}.mlp.gate|up|down_proj.weight    (transposed)
  decoder.final_norm.scale                model.norm.weight
  decoder.lm_head.kernel [d, Vp]          lm_head.weight [V, d]                   (absent when tied)

HF Llama applies RoPE in the rotate-half layout (q * cos + rotate_half(q) * sin over the two halves of the
head dim), the layout of memlm.layers.rope, so q/k weights are copied without a permutation (the tests check
logits). GPT-2 (GPT2LMHeadModel, prefix `transformer.` optional) uses Conv1D weights stored [in, out], so
nothing is transposed; the fused c_attn [d, 3d] is split into wq|wk|wv:

  decoder.embedding / pos_embedding       wte.weight / wpe.weight
  decoder.blocks.{i}.attn_norm|mlp_norm   h.{i}.ln_1|ln_2.weight|bias      (scale|bias)
  decoder.blocks.{i}.attn.wq|wk|wv        h.{i}.attn.c_attn.weight|bias    (thirds of the last axis)
  decoder.blocks.{i}.attn.wo              h.{i}.attn.c_proj.weight|bias
  decoder.blocks.{i}.mlp.w1|w2            h.{i}.mlp.c_fc|c_proj.weight|bias
  decoder.final_norm                      ln_f.weight|bias
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from memlm.convert import safetensors_io as st
from memlm.errors import UserError, not_utf8

SUPPORTED = ("llama", "gpt2")
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation of GELU
# Buffers some checkpoints carry that are not parameters (causal masks, RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Spec:
    """One HF tensor <-> one or more memlm flat names (`memlm.convert.flat` naming)."""

    hf: str
    memlm: tuple[str, ...]
    op: str  # id | T | rows | T_cols | split
    hf_shape: tuple[int, ...]


# ---- config.json -> ModelConfig fields ----------------------------------------------------------------------
def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (a Hugging Face checkpoint dir has config.json + model.safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: top level must be an object")
    return cfg


def architecture(hf: dict, source: str = "config.json") -> str:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        archs = hf.get("architectures") or []
        raise UserError(f"{source}: model_type {kind!r} ({', '.join(map(str, archs)) or 'no architectures'}) is "
                        f"not supported; memlm imports {' and '.join(SUPPORTED)} checkpoints")
    return kind


def _int(hf: dict, key: str, source: str, default=None) -> int:
    v = hf.get(key, default)
    if v is None:
        raise UserError(f"{source}: missing key {key}")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{source}: {key} must be a positive integer, got {v!r}")
    return v


def _float(hf: dict, key: str, source: str, default: float) -> float:
    v = hf.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise UserError(f"{source}: {key} must be a positive number, got {v!r}")
    return float(v)


def _require(hf: dict, key: str, ok, source: str, default, what: str) -> None:
    v = hf.get(key, default)
    if not ok(v):
        raise UserError(f"{source}: {key}={v!r} is not supported ({what})")


def model_fields(hf: dict, source: str = "config.json") -> dict:
    """ModelConfig fields implied by a HF config.json (raises UserError on unsupported features)."""
    arch = architecture(hf, source)
    if arch == "gpt2":
        d = _int(hf, "n_embd", source)
        heads = _int(hf, "n_head", source)
        if d % heads:
            raise UserError(f"{source}: n_embd ({d}) is not divisible by n_head ({heads})")
        _require(hf, "activation_function", lambda v: v in GPT2_GELU, source, "gelu_new",
                 f"memlm's GPT-2 MLP is the tanh GELU: {', '.join(GPT2_GELU)}")
        _require(hf, "scale_attn_weights", lambda v: v is True, source, True, "scores are scaled by 1/sqrt(d)")
        _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: v is False, source, False, "no layer scaling")
        _require(hf, "add_cross_attention", lambda v: v is False, source, False, "decoder-only")
        n_inner = hf.get("n_inner")
        return {
            "arch": "gpt2",
            "vocab_size": _int(hf, "vocab_size", source),
            "d_model": d,
            "n_layers": _int(hf, "n_layer", source),
            "n_heads": heads,
            "n_kv_heads": 0,
            "head_dim": 0,
            "d_ff": 4 * d if n_inner is None else _int(hf, "n_inner", source),
            "max_seq_len": _int(hf, "n_positions", source),
            "norm_eps": _float(hf, "layer_norm_epsilon", source, 1e-5),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        }
    d = _int(hf, "hidden_size", source)
    heads = _int(hf, "num_attention_heads", source)
    kv = _int(hf, "num_key_value_heads", source, heads)
    head_dim = hf.get("head_dim") or d // heads
    head_dim = _int({"head_dim": head_dim}, "head_dim", source)
    if heads % kv:
        raise UserError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    _require(hf, "hidden_act", lambda v: v == "silu", source, "silu", "memlm's Llama MLP is SwiGLU")
    _require(hf, "attention_bias", lambda v: not v, source, False, "the Llama backbone has no biases")
    _require(hf, "mlp_bias", lambda v: not v, source, False, "the Llama backbone has no biases")
    rope = hf.get("rope_parameters") or {}
    _require(hf, "rope_scaling", lambda v: not v or v.get("rope_type", v.get("type")) == "default", source,
             None, "plain RoPE only")
    _require({"rope_parameters.rope_type": rope.get("rope_type", "default")}, "rope_parameters.rope_type",
             lambda v: v == "default", source, "default", "plain RoPE only")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return {
        "arch": "llama",
        "vocab_size": _int(hf, "vocab_size", source),
        "d_model": d,
        "n_layers": _int(hf, "num_hidden_layers", source),
        "n_heads": heads,
        "n_kv_heads": kv if kv != heads else 0,
        "head_dim": head_dim if head_dim != d // heads or d % heads else 0,
        "d_ff": _int(hf, "intermediate_size", source),
        "max_seq_len": _int(hf, "max_position_embeddings", source, 2048),
        "rope_theta": _float({"rope_theta": theta}, "rope_theta", source, 10000.0),
        "norm_eps": _float(hf, "rms_norm_eps", source, 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def config_json(m, dtype: str, eos_id: int | None = None) -> dict:
    """A HF config.json for memlm ModelConfig `m` (LlamaForCausalLM or GPT2LMHeadModel)."""
    if m.arch == "gpt2":
        if m.kv_heads != m.n_heads or m.hd * m.n_heads != m.d_model:
            raise UserError("model: GPT-2 export needs n_kv_heads = n_heads and head_dim = d_model / n_heads")
        out = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.ff,
            "n_positions": m.max_seq_len,
            "n_ctx": m.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "scale_attn_weights": True,
            "tie_word_embeddings": m.tie_embeddings,
        }
    else:
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": m.vocab_size,
            "hidden_size": m.d_model,
            "intermediate_size": m.ff,
            "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.kv_heads,
            "head_dim": m.hd,
            "hidden_act": "silu",
            "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": m.tie_embeddings,
        }
    out["torch_dtype"] = dtype
    if eos_id is not None:
        out["eos_token_id"] = eos_id
        out["bos_token_id"] = eos_id
    return out


# ---- tensor specs -------------------------------------------------------------------------------------------
def specs(m, prefix: str = "") -> list[Spec]:
    """Every HF tensor of a backbone with config `m`, with its memlm names and conversion."""
    d, L, V, f = m.d_model, m.n_layers, m.vocab_size, m.ff
    b = "decoder.blocks.{i}."
    if m.arch == "gpt2":
        out = [Spec(prefix + "wte.weight", ("decoder.embedding",), "rows", (V, d)),
               Spec(prefix + "wpe.weight", ("decoder.pos_embedding",), "id", (m.max_seq_len, d))]
        for i in range(L):
            h = f"{prefix}h.{i}."
            bi = b.format(i=i)
            for hn, mn in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out += [Spec(h + hn + ".weight", (bi + mn + ".scale",), "id", (d,)),
                        Spec(h + hn + ".bias", (bi + mn + ".bias",), "id", (d,))]
            qkv = tuple(bi + f"attn.{w}" for w in ("wq", "wk", "wv"))
            out += [Spec(h + "attn.c_attn.weight", tuple(n + ".kernel" for n in qkv), "split", (d, 3 * d)),
                    Spec(h + "attn.c_attn.bias", tuple(n + ".bias" for n in qkv), "split", (3 * d,))]
            for hn, mn, shape in (("attn.c_proj", "attn.wo", (d, d)), ("mlp.c_fc", "mlp.w1", (d, f)),
                                  ("mlp.c_proj", "mlp.w2", (f, d))):
                out += [Spec(h + hn + ".weight", (bi + mn + ".kernel",), "id", shape),
                        Spec(h + hn + ".bias", (bi + mn + ".bias",), "id", (shape[1],))]
        out += [Spec(prefix + "ln_f.weight", ("decoder.final_norm.scale",), "id", (d,)),
                Spec(prefix + "ln_f.bias", ("decoder.final_norm.bias",), "id", (d,))]
    else:
        hq, hkv = m.n_heads * m.hd, m.kv_heads * m.hd
        out = [Spec("model.embed_tokens.weight", ("decoder.embedding",), "rows", (V, d))]
        for i in range(L):
            h = f"model.layers.{i}."
            bi = b.format(i=i)
            out += [
                Spec(h + "input_layernorm.weight", (bi + "attn_norm.scale",), "id", (d,)),
                Spec(h + "self_attn.q_proj.weight", (bi + "attn.wq.kernel",), "T", (hq, d)),
                Spec(h + "self_attn.k_proj.weight", (bi + "attn.wk.kernel",), "T", (hkv, d)),
                Spec(h + "self_attn.v_proj.weight", (bi + "attn.wv.kernel",), "T", (hkv, d)),
                Spec(h + "self_attn.o_proj.weight", (bi + "attn.wo.kernel",), "T", (d, hq)),
                Spec(h + "post_attention_layernorm.weight", (bi + "mlp_norm.scale",), "id", (d,)),
                Spec(h + "mlp.gate_proj.weight", (bi + "mlp.w1.kernel",), "T", (f, d)),
                Spec(h + "mlp.up_proj.weight", (bi + "mlp.w3.kernel",), "T", (f, d)),
                Spec(h + "mlp.down_proj.weight", (bi + "mlp.w2.kernel",), "T", (d, f)),
            ]
        out.append(Spec("model.norm.weight", ("decoder.final_norm.scale",), "id", (d,)))
    if not m.tie_embeddings:
        out.append(Spec("lm_head.weight", ("decoder.lm_head.kernel",), "T_cols", (V, d)))
    return out


def to_memlm(spec: Spec, x: np.ndarray, padded_vocab: int) -> dict[str, np.ndarray]:
    """One HF tensor -> its memlm flat tensor(s)."""
    if spec.op == "id":
        return {spec.memlm[0]: x}
    if spec.op == "T":
        return {spec.memlm[0]: x.T}
    if spec.op == "rows":  # padding rows are never looked up or predicted: zeros
        return {spec.memlm[0]: np.pad(x, ((0, padded_vocab - x.shape[0]), (0, 0)))}
    if spec.op == "T_cols":
        return {spec.memlm[0]: np.pad(x.T, ((0, 0), (0, padded_vocab - x.shape[0])))}
    parts = np.split(x, len(spec.memlm), axis=-1)
    return dict(zip(spec.memlm, parts))


def to_hf(spec: Spec, flat: dict[str, np.ndarray], vocab: int) -> np.ndarray:
    """The memlm flat tensor(s) of `spec` -> the HF tensor."""
    xs = [flat[n] for n in spec.memlm]
    if spec.op == "id":
        return xs[0]
    if spec.op == "T":
        return xs[0].T
    if spec.op == "rows":
        return xs[0][:vocab]
    if spec.op == "T_cols":
        return xs[0][:, :vocab].T
    return np.concatenate(xs, axis=-1)


# ---- reading a HF checkpoint --------------------------------------------------------------------------------
def weight_files(directory: str) -> list[str]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    single = os.path.join(directory, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wmap = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):  # ValueError: bad JSON or not UTF-8
            raise UserError(f"{index}: not a safetensors index (needs a weight_map)") from None
        return [os.path.join(directory, s) for s in sorted(set(wmap.values()))]
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
        raise UserError(f"{directory}: has pytorch_model.bin but no model.safetensors; re-save it with "
                        "transformers' save_pretrained(..., safe_serialization=True)")
    raise UserError(f"{single}: not found")


def read_backbone(directory: str, m) -> dict[str, np.ndarray]:
    """Read and check the HF tensors of `directory` against memlm config `m`; return memlm flat tensors.

    Missing tensors, shapes that disagree with config.json and unknown tensors raise a UserError naming the
    tensor. Values are converted to float32.
    """
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for path in weight_files(directory):
        t, _ = st.read(path)
        for k, v in t.items():
            tensors[k], where[k] = v, path
    prefix = ""
    if m.arch == "gpt2" and any(k.startswith("transformer.") for k in tensors):
        prefix = "transformer."
    table = specs(m, prefix)
    wanted = {s.hf for s in table}
    src = os.path.join(directory, "config.json")
    for s in table:
        if s.hf not in tensors:
            raise UserError(f"{directory}: missing tensor {s.hf} (expected from {src})")
        if tuple(tensors[s.hf].shape) != s.hf_shape:
            raise UserError(f"{where[s.hf]}: tensor {s.hf} has shape {list(tensors[s.hf].shape)} but config.json "
                            f"implies {list(s.hf_shape)}")
    emb = table[0].hf
    for k in sorted(tensors):
        if k in wanted or k.endswith(_IGNORED_SUFFIXES):
            continue
        if k == "lm_head.weight" and m.tie_embeddings:
            # some writers store the tied head anyway; accept it only if it really is the embedding
            if tensors[k].shape != tensors[emb].shape or not np.array_equal(tensors[k], tensors[emb]):
                raise UserError(f"{where[k]}: tensor lm_head.weight differs from {emb} but config.json says "
                                "tie_word_embeddings=true")
            continue
        raise UserError(f"{where[k]}: unexpected tensor {k} (not part of the {m.arch} layout config.json "
                        "describes)")
    flat: dict[str, np.ndarray] = {}
    for s in table:
        x = np.asarray(tensors[s.hf], dtype=np.float32)
        flat.update(to_memlm(s, x, m.padded_vocab))
    return flat


def backbone_tensors(m, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """memlm flat decoder tensors -> HF tensors (GPT-2 names carry the `transformer.` prefix)."""
    missing = sorted({n for s in specs(m) for n in s.memlm} - set(flat))
    if missing:
        raise UserError(f"model.kind={m.kind}: the backbone has no tensor {missing[0]}; this kind changes the "
                        "decoder and has no plain Llama/GPT-2 form")
    prefix = "transformer." if m.arch == "gpt2" else ""
    return {s.hf: np.ascontiguousarray(to_hf(s, flat, m.vocab_size)) for s in specs(m, prefix)}


def backbone_names(m) -> set[str]:
    """The memlm flat names an HF export covers (everything else goes to memory.safetensors)."""
    return {n for s in specs(m) for n in s.memlm}
