"""Tokenizer files between Hugging Face checkpoint dirs and memlm's tokenizers (memlm.data.tokenizers).

GPT-2 byte-level BPE (Radford et al. 2019): HF stores tokens as strings over a printable stand-in alphabet
(each byte b -> one unicode character, `byte_alphabet`) in vocab.json + merges.txt or tokenizer.json; memlm
reads a tiktoken ranks file (`<base64 bytes> <rank>` per line, rank = token id). BPE by merge order and BPE by
rank agree when the token made by merge i has id 256 + i, which holds for GPT-2 (50,000 merges after the 256
byte tokens, then <|endoftext|> = 50256); the conversion checks it. SentencePiece models are copied as is.
"""

from __future__ import annotations

import base64
import json
import os

from memlm.data.tokenizers import GPT2_ENDOFTEXT, GPT2_NUM_RANKS, _read_tiktoken_ranks
from memlm.errors import UserError

SP_FILE = "tokenizer.model"
TIKTOKEN_FILE = "gpt2.tiktoken"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes are themselves, the other 68 bytes are
    shifted to code points 256, 257, ... in byte order (so every token is a printable string)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _to_bytes(token: str, inverse: dict[str, int], source: str) -> bytes:
    try:
        return bytes(inverse[c] for c in token)
    except KeyError:
        raise UserError(f"{source}: token {token!r} is not byte-level BPE (GPT-2 alphabet)") from None


def find(directory: str) -> tuple[str, list[str]] | None:
    """("sentencepiece" | "gpt2", files) for the tokenizer of a HF checkpoint dir, or None."""
    sp = os.path.join(directory, SP_FILE)
    if os.path.isfile(sp):
        return "sentencepiece", [sp]
    tj = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tj):
        return "gpt2", [tj]
    vj, mt = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.isfile(vj) and os.path.isfile(mt):
        return "gpt2", [vj, mt]
    return None


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None


def _read_hf_bpe(files: list[str]) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """(vocab, merges, source label) from tokenizer.json or vocab.json + merges.txt."""
    if len(files) == 1:
        src = files[0]
        tj = _load_json(src)
        model = tj.get("model") if isinstance(tj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise UserError(f"{src}: model.type is {model.get('type') if isinstance(model, dict) else None!r}; "
                            "memlm converts byte-level BPE (GPT-2) tokenizers only")
        vocab = dict(model.get("vocab") or {})
        for added in tj.get("added_tokens") or []:
            vocab.setdefault(added.get("content"), added.get("id"))
        raw = model.get("merges") or []
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]
        return vocab, merges, src
    vj, mt = files
    vocab = _load_json(vj)
    try:
        with open(mt, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{mt}: not readable ({type(e).__name__})") from None
    merges = [tuple(ln.split(" ", 1)) for ln in lines if ln and not ln.startswith("#version")]
    return vocab, merges, vj


def gpt2_ranks_from_hf(files: list[str], expect: int | None = GPT2_NUM_RANKS) -> dict[bytes, int]:
    """tokenizer.json (or vocab.json + merges.txt) of a byte-level BPE -> tiktoken mergeable ranks.

    `expect`: the number of BPE tokens required (GPT-2's 50256, what memlm's gpt2 tokenizer reads); None
    accepts any size. <|endoftext|>, if present, must come right after them.
    """
    vocab, merges, src = _read_hf_bpe(files)
    if not isinstance(vocab, dict):
        raise UserError(f"{src}: vocab is not a mapping")
    inverse = {c: b for b, c in byte_alphabet().items()}
    eot = vocab.pop(GPT2_ENDOFTEXT, None)
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        ranks[_to_bytes(token, inverse, src)] = int(idx)
    n = len(ranks)
    if (expect is not None and n != expect) or set(ranks.values()) != set(range(n)):
        raise UserError(f"{src}: {n} BPE tokens; memlm's gpt2 tokenizer reads the GPT-2 vocabulary "
                        f"(ids 0..{GPT2_NUM_RANKS - 1} + {GPT2_ENDOFTEXT}); pass --no-tokenizer to import the "
                        "weights alone")
    if eot is not None and eot != n:
        raise UserError(f"{src}: {GPT2_ENDOFTEXT} has id {eot}, expected {n} (right after the BPE tokens)")
    for i, pair in enumerate(merges):
        if len(pair) != 2:
            raise UserError(f"{src}: merge {i} is not a pair: {pair!r}")
        merged = _to_bytes(pair[0] + pair[1], inverse, src)
        if ranks.get(merged) != 256 + i:
            raise UserError(f"{src}: merge {i} {pair!r} makes token id {ranks.get(merged)}, not {256 + i}: "
                            "merge order and token ids disagree, so it cannot be read as tiktoken ranks")
    if len(merges) != n - 256:
        raise UserError(f"{src}: {len(merges)} merges for {n} tokens (expected {n - 256}: 256 bytes + merges)")
    return ranks


def tiktoken_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(tok).decode()} {r}\n" for tok, r in sorted(ranks.items(), key=lambda x: x[1]))


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that makes `token`: BPE over its bytes with only tokens of lower rank allowed."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for j in range(len(parts) - 1):
            r = ranks.get(parts[j] + parts[j + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, j
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise UserError(f"tokenizer: token {token!r} cannot be built by merging lower-ranked tokens")
    return parts[0], parts[1]


def hf_files_from_tiktoken(path: str) -> dict[str, str]:
    """memlm's GPT-2 ranks file -> {"vocab.json", "merges.txt", "tokenizer_config.json": text}."""
    ranks = _read_tiktoken_ranks(path)
    alpha = byte_alphabet()
    text = lambda b: "".join(alpha[x] for x in b)  # noqa: E731
    vocab = {text(tok): r for tok, r in ranks.items()}
    vocab[GPT2_ENDOFTEXT] = len(ranks)
    merges = ["#version: 0.2"]
    for tok, _ in sorted(ranks.items(), key=lambda x: x[1]):
        if len(tok) > 1:
            a, b = _merge_of(tok, ranks)
            merges.append(f"{text(a)} {text(b)}")
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_ENDOFTEXT, "eos_token": GPT2_ENDOFTEXT,
              "unk_token": GPT2_ENDOFTEXT, "add_prefix_space": False, "model_max_length": 1_000_000}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": "\n".join(merges) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2)}
