"""`memlm export` and `memlm import`: run dirs <-> params-only orbax, flat safetensors, Hugging Face dirs.

Everything is read and checked before anything is written; outputs are written to a temporary sibling and
renamed into place at the end, so a failed command leaves the destination as it was. An existing
destination is only replaced with `force`.

An imported run dir is what `memlm train` resumes from (memlm.train.loop): config.yaml (run.dir = the dir)
and checkpoints/0 holding the full train state: params, a fresh optimizer state for `train.*`, the initial
memory carry for `train.batch_size` rows, and a fresh data position (the first `memlm train` starts the data
anew and checks data.* then; `train.batch_size` is fixed at import, since the carry has one row per batch slot).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid

import jax
import numpy as np
import yaml

from memlm import config as config_lib
from memlm import sharding
from memlm.checkpoint import Checkpointer, save_params_only
from memlm.convert import flat as flat_lib
from memlm.convert import hf as hf_lib
from memlm.convert import safetensors_io as st
from memlm.convert import tokenizer as tok_lib
from memlm.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("params", "safetensors", "hf")
DTYPES = ("float32", "bfloat16")
MEMLM_YAML = "memlm.yaml"
MEMORY_FILE = "memory.safetensors"
# Backbone keys fixed by the imported weights (compared through the derived properties).
_LOCKED = {"arch": "arch", "vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers",
           "n_heads": "n_heads", "kv_heads": "n_kv_heads", "hd": "head_dim", "ff": "d_ff",
           "tie_embeddings": "tie_embeddings"}


# ---- shared helpers -----------------------------------------------------------------------------------------
def _np_dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    import ml_dtypes

    return np.float32 if name == "float32" else ml_dtypes.bfloat16


def _check_destination(out: str, force: bool, what: str, source: str, markers: tuple[str, ...] = (),
                       file_output: bool = False) -> None:
    """The output may be replaced (--force) but never be, contain or sit inside the source it is made from.
    --force replaces a directory only if it is empty or holds one of `markers` (a previous output of this kind:
    never a directory of the user's that happens to be named), and a file only if the output is a file
    (`file_output`) and that file is a previous safetensors export. Missing parent directories are made when the
    output is written (_tmp_sibling), as `memlm train` makes run.dir's."""
    o, src = os.path.realpath(out), os.path.realpath(source)
    if os.path.commonpath([o, src]) in (o, src):
        raise UserError(f"{out}: the output would overwrite its own source {source}; choose another path")
    if os.path.lexists(out) and not force:
        raise UserError(f"{out}: already exists (pass --force to overwrite the {what})")
    if os.path.isdir(out) and not os.path.islink(out) and os.listdir(out) and not any(
            os.path.isfile(os.path.join(out, m)) for m in markers):
        kind = f"a previous {what} (no {' or '.join(markers)})" if markers else f"a {what}"
        raise UserError(f"{out}: a directory that is not {kind}; --force does not replace it")
    if os.path.lexists(out) and not os.path.isdir(out) and not (file_output and _is_safetensors_export(out)):
        raise UserError(f"{out}: a file that is not a previous {what}; --force does not replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise UserError(f"{out}: parent {parent} is a file, not a directory")


def _is_safetensors_export(path: str) -> bool:
    """A file `memlm export --format safetensors` wrote (its header carries the memlm config)."""
    try:
        return "memlm.config" in st.read_header(path)[1]
    except (UserError, OSError):
        return False


# what a directory written by `export --format F` holds (safetensors writes a file: no directory is replaced)
EXPORT_MARKERS = {"hf": ("config.json",), "params": ("_CHECKPOINT_METADATA", "_METADATA")}


def _tmp_sibling(out: str) -> str:
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")


def _commit(tmp: str, out: str) -> None:
    """Move the finished temporary output onto `out` (replacing it: the caller checked --force)."""
    out = os.path.abspath(out)
    if os.path.isdir(out) and not os.path.islink(out):
        shutil.rmtree(out)
    elif os.path.lexists(out):
        os.remove(out)
    os.replace(tmp, out)


def _discard(tmp: str) -> None:
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.remove(tmp)


def single_device_mesh():
    return sharding.make_mesh(1, 1, 1, jax.local_devices()[:1])


def _setup(cfg, batch_size: int | None = None):
    """The trainer's Setup (abstract params, optimizer, carry) on one local device."""
    from memlm.train import setup as setup_lib

    return setup_lib.build_setup(cfg, single_device_mesh(), batch_size)


def _memory_names(names, m) -> list[str]:
    return sorted(set(names) - hf_lib.backbone_names(m))


def plain_backbone(m, flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], str]:
    """(the plain decoder's flat tensors, the memory tensors' names, a README note) for an HF export.

    Kinds that lay the decoder out differently (memory_layers, titans) give `plain_layout` in their module:
    their layers `decoder.<stack>.{j}.*` are renamed back to `decoder.blocks.{i}.*`, and the FFN of layers that
    have none (memory layers) is filled with zeros. Memory tensors keep their own names (memory.safetensors)."""
    from memlm.models.lm import memory_module

    hook = getattr(memory_module(m.kind), "plain_layout", None)
    if hook is None:
        return flat, _memory_names(flat, m), ""
    layer, zero_ffn, note = hook(m)

    def plain_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "decoder" and len(parts) > 3 and parts[2].isdigit() and (parts[1], int(parts[2])) in layer:
            return ".".join(["decoder", "blocks", str(layer[parts[1], int(parts[2])]), *parts[3:]])
        return name

    backbone = hf_lib.backbone_names(m)
    plain = {plain_name(n): x for n, x in flat.items() if plain_name(n) in backbone}
    memory = sorted(n for n in flat if plain_name(n) not in backbone)
    dtype = next(iter(flat.values())).dtype
    zero_prefixes = tuple(f"decoder.blocks.{i}.mlp." for i in zero_ffn)
    for s in hf_lib.specs(m):
        if all(n.startswith(zero_prefixes) and n not in plain for n in s.memlm):
            plain.update(hf_lib.to_memlm(s, np.zeros(s.hf_shape, dtype), m.padded_vocab))
    return plain, memory, note


# ---- export -------------------------------------------------------------------------------------------------
def load_run_params(run: str, step: int | None, cfg=None):
    """(config, step, params on one device) of a run dir's checkpoint (latest unless `step`); cfg: the run's
    config when already read."""
    cfg = cfg or config_lib.read_run_config(run)
    ckpt = Checkpointer(os.path.join(run, "checkpoints"), async_save=False, create=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise UserError(f"{run}: no checkpoint found")
        step = max(steps) if step is None else step
        if step not in steps:
            raise UserError(f"--step: {run} has no checkpoint at step {step} (have {sorted(steps)})")
        params = ckpt.restore_params(step, _setup(cfg, batch_size=1).abstract_params)
    finally:
        ckpt.close()
    return cfg, step, params


def _readme(cfg, step: int, memory: list[str], tokenizer_note: str, layout_note: str = "") -> str:
    m = cfg.model
    cls = "GPT2LMHeadModel" if m.arch == "gpt2" else "LlamaForCausalLM"
    lines = [
        f"# memlm export (model.kind={m.kind}, arch={m.arch}, step {step})",
        "",
        f"`config.json` + `model.safetensors` are a plain Hugging Face `{cls}` holding the backbone:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(THIS_DIR)",
        "```",
        "",
        f"`{MEMLM_YAML}` is the full memlm config of the run. {tokenizer_note}",
        "",
        *([layout_note, ""] if layout_note else []),
    ]
    if memory:
        lines += [
            f"`{MEMORY_FILE}` holds the memory parameters of model.kind={m.kind} (everything outside the",
            "Hugging Face backbone), under memlm's flat names (stacked layers unstacked: `decoder.blocks.3.x`):",
            "",
            *[f"- `{n}`" for n in memory[:20]],
            *(["- ..."] if len(memory) > 20 else []),
            "",
            "The backbone alone is not the memory model: it runs without the memory. To get the memory model",
            "back, `memlm import hf THIS_DIR --out RUN_DIR` restores backbone + memory (it reads",
            f"`{MEMLM_YAML}` and `{MEMORY_FILE}` when model.kind is unchanged), or in Python:",
            "",
            "```python",
            "from memlm.convert.safetensors_io import read",
            f"tensors, metadata = read('{MEMORY_FILE}')   # name -> numpy array (bfloat16 via ml_dtypes)",
            "```",
            "",
        ]
    return "\n".join(lines)


def _tokenizer_files(cfg) -> tuple[dict[str, bytes], str]:
    """Tokenizer files for a HF export dir, and a README sentence about them."""
    d = cfg.data
    if d.tokenizer == "gpt2" and d.tokenizer_path and os.path.isfile(d.tokenizer_path):
        files = tok_lib.hf_files_from_tiktoken(d.tokenizer_path)
        return ({k: v.encode("utf-8") for k, v in files.items()},
                "vocab.json/merges.txt are the run's GPT-2 BPE (AutoTokenizer loads them).")
    if d.tokenizer == "sentencepiece" and d.tokenizer_path and os.path.isfile(d.tokenizer_path):
        with open(d.tokenizer_path, "rb") as f:
            return {tok_lib.SP_FILE: f.read()}, f"`{tok_lib.SP_FILE}` is the run's SentencePiece model."
    return {}, f"The run's tokenizer ({d.tokenizer}) has no Hugging Face file here."


def export_run(run: str, fmt: str, out: str, step: int | None = None, dtype: str = "float32",
               force: bool = False) -> dict:
    """Export a run's checkpoint (see the CLI help). Returns a summary."""
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    npd = _np_dtype(dtype)
    cfg = config_lib.read_run_config(run)  # a bad --run is named before a bad --out
    _check_destination(out, force, "export", run, EXPORT_MARKERS.get(fmt, ()), file_output=fmt == "safetensors")
    cfg, step, params = load_run_params(run, step, cfg)
    flat = flat_lib.to_flat(params, npd) if fmt != "params" else None
    files: dict[str, bytes] = {}
    if fmt == "hf":
        m = cfg.model
        plain, memory, layout_note = plain_backbone(m, flat)
        backbone = hf_lib.backbone_tensors(m, plain)
        tok_files, note = _tokenizer_files(cfg)
        eos = 50256 if cfg.data.tokenizer == "gpt2" else None
        files["config.json"] = json.dumps(hf_lib.config_json(m, dtype, eos), indent=2).encode()
        files[MEMLM_YAML] = config_lib.to_yaml(cfg).encode()
        files["README.md"] = _readme(cfg, step, memory, note, layout_note).encode()
        files.update(tok_files)
    tmp = _tmp_sibling(out)
    try:
        if fmt == "params":
            cast = jax.tree.map(lambda x: x.astype(npd), params)
            save_params_only(tmp, cast)
        elif fmt == "safetensors":
            meta = {"format": "memlm", "memlm.config": config_lib.to_yaml(cfg), "memlm.step": str(step),
                    "memlm.layers": "unstacked"}
            st.write(tmp, flat, meta)
        else:
            os.makedirs(tmp)
            st.write(os.path.join(tmp, "model.safetensors"), backbone, {"format": "pt"})
            if memory:
                st.write(os.path.join(tmp, MEMORY_FILE), {n: flat[n] for n in memory},
                         {"format": "memlm", "memlm.kind": cfg.model.kind})
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
        _commit(tmp, out)
    except BaseException:
        _discard(tmp)
        raise
    return {"run": os.path.abspath(run), "step": step, "format": fmt, "dtype": dtype, "out": os.path.abspath(out)}


# ---- import -------------------------------------------------------------------------------------------------
def _override_keys(overrides: list[str]) -> dict[str, str]:
    return {o.split("=", 1)[0].strip(): o.split("=", 1)[1] for o in overrides if "=" in o}


def _train_state(setup, params):
    """A fresh optimizer state and memory carry for `params` (what `memlm train` starts a run with)."""
    from memlm.train import setup as setup_lib

    return setup_lib.init_opt_state(setup, params), setup_lib.init_carry(setup, params)


def _data_position(cfg, tokenizer) -> dict:
    """A fresh data position: the trainer starts the data anew (and validates data.* then), so an import needs
    no training data at hand."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ({tokenizer.name})")
    return {"fresh": True}


def _write_run(setup, params, out: str, tokenizer, extra: dict[str, bytes]) -> None:
    """Write config.yaml, `extra` files and checkpoints/0 (full train state) to `out` via a temp dir."""
    cfg = setup.cfg
    position = _data_position(cfg, tokenizer)
    opt, carry = _train_state(setup, params)
    tmp = _tmp_sibling(out)
    try:
        os.makedirs(tmp)
        for rel, data in extra.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
        config_lib.save_config(cfg, os.path.join(tmp, "config.yaml"))
        ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
        ckpt.save(0, params, opt, carry, position, force=True)
        ckpt.close()
        _commit(tmp, out)
    except BaseException:
        _discard(tmp)
        raise


def _bring_tokenizer(path: str, out: str, raw: dict) -> tuple[dict[str, bytes], object | None]:
    """Tokenizer files for the run dir (converted), with raw["data"] pointed at them; and the tokenizer."""
    from memlm.data.tokenizers import load_tokenizer

    found = tok_lib.find(path)
    if found is None:
        return {}, None
    kind, files = found
    if kind == "sentencepiece":
        with open(files[0], "rb") as f:
            data = f.read()
        rel = os.path.join("tokenizer", tok_lib.SP_FILE)
    else:
        data = tok_lib.tiktoken_text(tok_lib.gpt2_ranks_from_hf(files)).encode()
        rel = os.path.join("tokenizer", tok_lib.TIKTOKEN_FILE)
    # Load it from a scratch copy now: a bad file fails before anything is written.
    scratch = _tmp_sibling(out) + ".tok"
    with open(scratch, "wb") as f:
        f.write(data)
    try:
        tokenizer = load_tokenizer(kind, scratch)
    except UserError as e:  # it names the scratch copy: name the file the user has instead
        raise UserError(str(e).replace(scratch, files[0] if kind == "sentencepiece" else path)) from None
    finally:
        os.remove(scratch)
    raw.setdefault("data", {})
    raw["data"]["tokenizer"] = kind
    raw["data"]["tokenizer_path"] = os.path.join(os.path.abspath(out), rel)
    return {rel: data}, tokenizer


def import_hf(path: str, out: str, overrides: list[str] | None = None, force: bool = False,
              no_tokenizer: bool = False) -> dict:
    """A HF Llama / GPT-2 checkpoint dir -> a memlm run dir (backbone imported, memory freshly initialised)."""
    overrides = list(overrides or [])
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory (a Hugging Face checkpoint dir)")
    _check_destination(out, force, "run dir", path, ("config.yaml",))
    hf_cfg = hf_lib.read_config(path)
    fields = hf_lib.model_fields(hf_cfg, os.path.join(path, "config.json"))
    raw: dict = {}
    saved_kind = None
    memlm_yaml = os.path.join(path, MEMLM_YAML)
    if os.path.isfile(memlm_yaml):  # written by `memlm export --format hf`: the run's own config
        raw = config_lib.load_config(memlm_yaml).model_dump(mode="json")
        saved = dict(raw["model"])
        saved_kind = saved["kind"]
        raw["train"]["init_from"] = None  # the import is the starting point
    keys = _override_keys(overrides)
    if saved_kind and "model.kind" in keys and yaml.safe_load(keys["model.kind"]) != saved_kind:
        for section in config_lib.MEMORY_SECTIONS:
            raw["model"].pop(section, None)
    raw.setdefault("model", {}).update(fields)
    raw.setdefault("run", {})["dir"] = os.path.abspath(out)
    tok_files, tokenizer = {}, None
    if not no_tokenizer and not any(k.startswith("data.tokenizer") for k in keys):
        tok_files, tokenizer = _bring_tokenizer(path, out, raw)
    cfg = config_lib.from_dict(config_lib.apply_overrides(raw, overrides), source=f"import {path}")
    want = config_lib.ModelConfig(**fields)
    locked = {**_LOCKED, **({"max_seq_len": "max_seq_len"} if want.arch == "gpt2" else {})}
    for prop, key in locked.items():
        if getattr(cfg.model, prop) != getattr(want, prop):
            raise UserError(f"model.{key}: {getattr(cfg.model, prop)!r} contradicts {path}/config.json "
                            f"({getattr(want, prop)!r}); the imported weights fix it")
    flat = hf_lib.read_backbone(path, cfg.model)
    from memlm.models.lm import memory_module

    remap = getattr(memory_module(cfg.model.kind), "from_plain_backbone", None)
    if remap is not None:  # the kind lays the decoder out differently (memory_layers: FFNs become memories)
        flat, dropped = remap(cfg.model, flat)
        if dropped:
            log.info("model.kind=%s replaces %d backbone tensors (e.g. %s); they are not imported",
                     cfg.model.kind, len(dropped), dropped[0])
    memory_file = os.path.join(path, MEMORY_FILE)
    mem: dict = {}  # the exported run's memory tensors, when they are imported
    if saved_kind == cfg.model.kind and os.path.isfile(memory_file):
        section = config_lib.MEMORY_SECTIONS.get(cfg.model.kind)
        diffs = [] if section is None else config_lib.config_differences(
            saved.get(section), getattr(cfg.model, section).model_dump(mode="json"), f"model.{section}")
        if diffs:
            key, was, now = diffs[0]
            log.warning("%s was %r in the exported run, %r now: the memory parameters of %s are not imported, the "
                        "memory starts fresh", key, was, now, memory_file)
        else:
            mem, _ = st.read(memory_file)
            flat.update(mem)
            log.info("memory parameters restored from %s", memory_file)
    if tokenizer is None:
        from memlm.data.pipeline import get_tokenizer

        tokenizer = get_tokenizer(cfg.data)
    from memlm.train import setup as setup_lib

    setup = _setup(cfg)
    known = {n for e in flat_lib.layout(setup.abstract_params) for n in e.names()}
    alien = sorted(set(flat) - known)
    alien_memory = [n for n in alien if n in mem]
    if alien_memory:
        raise UserError(f"{memory_file}: tensor {alien_memory[0]} is not a parameter of this "
                        f"model.kind={cfg.model.kind} model ({len(alien_memory)} such)")
    if alien:
        raise UserError(f"model.kind={cfg.model.kind}: its decoder does not have the plain {cfg.model.arch} layout "
                        f"(no parameter {alien[0]}), so a {hf_lib.architecture(hf_cfg)} checkpoint cannot be its "
                        "backbone")
    fresh = sorted(known - set(flat))
    if fresh:
        lost = saved_kind == cfg.model.kind and not os.path.isfile(memory_file)  # a memlm export without its memory
        log.log(logging.WARNING if lost else logging.INFO, "%d parameters are not in %s%s and start fresh (e.g. %s)",
                len(fresh), path, f" ({MEMORY_FILE} is missing)" if lost else "", fresh[0])
    params = setup_lib.init_params(setup, cfg.run.seed)
    flat.update(_scaled_to_the_embedding(cfg.model, flat, params))

    def given(p: tuple[str, ...]) -> bool:
        return ".".join(p) in flat or flat_lib.layer_name(p, 0) in flat

    params = flat_lib.from_flat(flat, params, f"{path}", strict=True, only=given)
    _write_run(setup, params, out, tokenizer, tok_files)
    return {"source": os.path.abspath(path), "out": os.path.abspath(out), "model.kind": cfg.model.kind,
            "arch": cfg.model.arch, "tokenizer": cfg.data.tokenizer, "step": 0}


def _scaled_to_the_embedding(model_cfg, flat: dict, params) -> dict:
    """The kind's fresh memory parameters drawn as N(0,1) * std(word embeddings) (its EMBEDDING_STD_PARAMS, e.g.
    RMT's M_0, models.md §1(a)), rescaled from model.init_std to the imported embedding's std: what the official
    code does when it wraps a pretrained model. Returns {name: array} for the ones the import does not give."""
    from memlm.models.lm import memory_module

    names = [n for n in getattr(memory_module(model_cfg.kind), "EMBEDDING_STD_PARAMS", ()) if n not in flat]
    if not names or "decoder.embedding" not in flat:
        return {}
    emb_std = float(np.std(np.asarray(flat["decoder.embedding"], np.float64)[: model_cfg.vocab_size]))
    fresh = flat_lib.to_flat(params, only=names)
    out = {n: (fresh[n] * (emb_std / model_cfg.init_std)).astype(fresh[n].dtype) for n in names}
    log.info("%s drawn with the imported embedding's std %.4g", ", ".join(names), emb_std)
    return out


def import_safetensors(path: str, out: str, overrides: list[str] | None = None, force: bool = False) -> dict:
    """A `memlm export --format safetensors` file -> a run dir with exactly those parameters."""
    overrides = list(overrides or [])
    _check_destination(out, force, "run dir", path, ("config.yaml",))
    _, meta, _ = st.read_header(path)
    if "memlm.config" not in meta:
        raise UserError(f"{path}: no memlm.config metadata (not written by `memlm export --format safetensors`)")
    try:
        raw = yaml.safe_load(meta["memlm.config"])
    except yaml.YAMLError:
        raise UserError(f"{path}: memlm.config metadata is not YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: memlm.config metadata is not a config mapping")
    raw.setdefault("run", {})["dir"] = os.path.abspath(out)
    cfg = config_lib.from_dict(config_lib.apply_overrides(raw, overrides), source=f"{path} memlm.config")
    flat, _ = st.read(path)
    from memlm.data.pipeline import get_tokenizer

    tokenizer = get_tokenizer(cfg.data)
    setup = _setup(cfg)
    params = flat_lib.from_flat(flat, setup.abstract_params, path, strict=True)
    _write_run(setup, params, out, tokenizer, {})
    return {"source": os.path.abspath(path), "out": os.path.abspath(out), "model.kind": cfg.model.kind, "step": 0}
