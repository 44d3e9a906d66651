"""Learning: associative recall across segments (issue #3).

Task (memlm.data.synthetic.AssociativeRecallCorpus): segment 1 holds P key/value pairs, the last segment
(segment 3 or later) asks for all of them again; only the recalled values are in the loss. Training uses
fresh documents every step (corpus seed 0), evaluation held-out documents (seed 1). A segment-local
baseline cannot see segment 1 from the last segment, so it stays at chance; a memory model must carry the
pairs through one filler-only segment.

Everything runs in-process (build_setup / jit_train_step, as tests/memory/test_pkm_learning.py) to avoid
the CLI start-up. tests/memory/test_rmt_learning.py replays RMT's full recipe through the CLI.

What is learned first (measured; see BENCHMARKS.md): every model quickly learns the *set* of stored values
but binds them to their keys much later. Per-answer accuracy shows it: the first recalled value is at
~1/P-of-the-set (18% after the CI runs of RMT and LM2) while the second, which the model can infer from the
set minus the value it has just seen, is at 43-65%. The ~70-75% plateau of the longer runs is this
"set, not binding" solution (50% first answer, ~100% second). The `full` tests assert the issue's >= 90%;
with these budgets they had not yet passed it when this file was written (the report lists the numbers).
Longer runs (6,000 steps, constant lr), a 2x wider and deeper backbone (on an H200) and 4 pairs per document
end on the same plateau, while a full-attention model on the same recipe binds (loss 0.05 after 3,000 steps):
BENCHMARKS.md "Associative recall" and "GPU (H200)".

Session 4 found why: the plateau is the backbone's. With a token or more in front of the text (a BOS; RMT's
read memory) even a full-attention model on the task in ONE segment stays on it (seed 0: 8,000 steps at lr 3e-3),
and RMT with the whole document in one segment does too. The `warm_start` recipe pre-trains the plain backbone
on the one-segment task with a 1-token prefix at lr 1e-3 (it binds) and gives it to the memory model:
`test_recall_full_warm_start` reaches the issue's >= 90% for RMT (96.8%) and HMT (98.5%) once the backbone is
pre-trained long enough to bind on every seed tried (6,000 steps); the segment-local baseline with the same backbone
stays at chance. LM2 reaches it since session 6 (99.9%; 92.6% with seed 1): its writes are routed to the slots by
position (the official code's time-to-slot mapping, now `lm2.write_routing`'s default), it has one 64-dimensional
memory head, and it trains 2 segments before 3. With writes routed by the read weights it stayed on the plateau in
every recipe tried; with 4 memory heads of 16 dims it bound in 1 run of 6 (BENCHMARKS.md).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm import sharding
from memlm.config import from_dict
from memlm.convert import flat as flat_lib
from memlm.data.synthetic import AssociativeRecallCorpus
from memlm.models.lm import memory_module
from memlm.train import setup as setup_lib
from memlm.train.loop import evaluate_loss
from tests.memory.common import fit, recall_batch

pytestmark = pytest.mark.integration

BACKBONE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "max_seq_len": 64, "dtype": "float32",
            "remat": "none", "vocab_size": 259}


def make_cfg(model: dict, n_segments: int, segment_len: int, steps: int, lr: float, batch: int,
             warmup: int, train_extra: dict | None = None) -> object:
    return from_dict({
        "run": {"dir": "/tmp/unused"},
        "train": {"steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": warmup, "weight_decay": 0.0,
                  "progress": False, **(train_extra or {})},
        "model": {**BACKBONE, **model},
        "data": {"source": "assoc_recall", "n_segments": n_segments, "segment_len": segment_len}})


def accuracy(setup, params, corpus, segment_len: int, n_docs: int = 512, batch: int = 128) -> dict:
    """Greedy answer accuracy on documents 0..n_docs-1 of `corpus`, streaming segment by segment.

    Returns {"acc": all answers, "per_answer": [accuracy of the 1st, 2nd, ... recalled value]}. (A model that
    stores the set of values but not which key they belong to gets 1/P on the first answer and more later.)
    """

    @jax.jit
    def hits(p, tokens, targets, mask):
        model = nnx.merge(setup.graphdef, p)
        carry = model.init_carry(tokens.shape[0])
        pos = jnp.broadcast_to(jnp.arange(segment_len), tokens[:, 0].shape)
        out = []
        for s in range(tokens.shape[1]):
            logits, carry = model.segment_logits(carry, tokens[:, s], pos)
            out.append(logits.argmax(-1) == targets[:, s])
        return jnp.stack(out, 1)

    per_answer = []
    with setup.activate():
        for start in range(0, n_docs, batch):
            b = recall_batch(corpus, start, batch, segment_len)
            hit = np.asarray(hits(params, b["tokens"], b["targets"], b["loss_mask"]))
            m = b["loss_mask"] > 0
            per_answer.append(hit[m].reshape(len(m), -1))  # [docs, P] in query order
    per_answer = np.concatenate(per_answer)
    return {"acc": float(per_answer.mean()), "per_answer": [round(float(x), 3) for x in per_answer.mean(0)]}


def train(model: dict, stages: list[tuple[int, int]], segment_len: int = 8, pairs: int = 2, values: int = 16,
          keys: int = 16, lr: float = 3e-3, batch: int = 32, warmup: int = 50, seed: int = 0,
          log_every: int = 0, train_extra: dict | None = None, params=None) -> dict:
    """Train through `stages` [(n_segments, steps), ...] (a curriculum, warm-started), evaluate the last.
    train_extra: more train.* config keys (e.g. {"min_lr_ratio": 1.0} for a constant lr after warmup).
    params: start from these instead of a fresh init (see warm_start).

    Returns {"acc", "steps", "train_s", "wall_s"}.
    """
    t_start = time.perf_counter()
    train_s, doc, n_steps = 0.0, 0, 0
    task = {"num_pairs": pairs, "num_keys": keys, "num_values": values}
    for n_seg, steps in stages:
        cfg = make_cfg(model, n_seg, segment_len, steps, lr, batch, warmup, train_extra)
        corpus = AssociativeRecallCorpus(10**9, n_seg, segment_len, seed=0, **task)
        first = doc  # fresh documents: every stage continues where the last one stopped
        setup, params, _, seconds = fit(cfg, lambda i, c=corpus, f=first: recall_batch(c, f + i * batch, batch,
                                                                                        segment_len),
                                        seed, params, log_every, label=f"seg={n_seg} loss")
        doc += steps * batch
        train_s += seconds
        n_steps += steps
    held_out = AssociativeRecallCorpus(10**9, n_seg, segment_len, seed=1, **task)
    ev = accuracy(setup, params, held_out, segment_len)
    return {"acc": ev["acc"], "per_answer": ev["per_answer"], "steps": n_steps, "train_s": train_s,
            "wall_s": time.perf_counter() - t_start,
            "params": params, "setup": setup}


# ---- warm start from a backbone that binds ------------------------------------------------------------------
# Session 4 (BENCHMARKS.md "Associative recall"): this 2-layer d=64 backbone learns the key/value binding as a
# seed- and lr-dependent phase transition, and tokens in front of the text (a BOS, RMT's read memory) delay it past
# every budget above, even with full attention and nothing to carry. A backbone pre-trained on the task in ONE
# segment (pairs and queries together) with one constant token in front binds (lr 1e-3, ~2,500 steps); given to a
# memory model (its decoder copied, the memory parameters fresh: how RMT is used on a pre-trained GPT-2), the
# memory learns to carry the binding across segments within a few hundred steps.
PREFIX_TOKEN = 2


def one_segment_batch(corpus, start: int, n: int, prefix: int) -> dict[str, np.ndarray]:
    """Documents start..start+n-1 of an S x L AssociativeRecallCorpus as ONE segment of prefix + S·L tokens (the
    prefix: constant PREFIX_TOKEN tokens, never a loss target)."""
    b = recall_batch(corpus, start, n, corpus.length - 1)
    if not prefix:
        return b
    pre = np.full((n, 1, prefix), PREFIX_TOKEN, np.int32)
    tok = np.concatenate([pre, b["tokens"]], -1)
    tgt = np.concatenate([pre[..., 1:], b["tokens"][..., :1], b["targets"]], -1)
    mask = np.concatenate([np.zeros((n, 1, prefix), np.float32), b["loss_mask"]], -1)
    pos = np.broadcast_to(np.arange(tok.shape[-1]), tok.shape).astype(np.int32).copy()
    return {"tokens": tok, "targets": tgt, "loss_mask": mask, "positions": pos, "reset": b["reset"]}


def train_one_segment(model: dict, prefix: int, steps: int, lr: float, seed: int = 0, batch: int = 32,
                      log_every: int = 0, doc: tuple[int, int] = (3, 8)) -> tuple[object, object, float]:
    """Train `model` on the one-segment task (the doc[0] x doc[1] document in one segment: nothing to carry);
    returns (setup, params, held-out loss): the answer loss on 256 documents of corpus seed 1 (not the last training
    batch's loss, which spikes at a constant lr: 0.25 at step 6,000 of a seed-0 run whose loss was 2e-4 at 5,000)."""
    cfg = make_cfg(model, 1, doc[0] * doc[1] + prefix, steps, lr, batch, 50, {"min_lr_ratio": 1.0})
    corpus = AssociativeRecallCorpus(10**9, doc[0], doc[1], seed=0, num_pairs=2)
    setup, params, _, _ = fit(cfg, lambda i: one_segment_batch(corpus, i * batch, batch, prefix), seed,
                              None, log_every, label=f"one segment, prefix {prefix}: loss")
    held_out = AssociativeRecallCorpus(10**9, doc[0], doc[1], seed=1, num_pairs=2)
    batches = [one_segment_batch(held_out, i * batch, batch, prefix) for i in range(256 // batch)]
    loss = evaluate_loss(setup, setup_lib.jit_eval_step(setup), params, batches, list(range(batch)))
    return setup, params, loss


def give_backbone(cfg, params, backbone):
    """A memory model's params with every backbone tensor replaced by the plain baseline's `backbone` (the names
    `memlm import hf` uses, remapped by the kind's from_plain_backbone where its decoder is laid out differently:
    Titans); the memory's own parameters keep their fresh init."""
    flat = flat_lib.to_flat(backbone)
    remap = getattr(memory_module(cfg.model.kind), "from_plain_backbone", None)
    if remap is not None:
        flat, _ = remap(cfg.model, flat)

    def given(path: tuple[str, ...]) -> bool:
        return ".".join(path) in flat or flat_lib.layer_name(path, 0) in flat

    return flat_lib.from_flat(flat, params, "pre-trained backbone", strict=True, only=given)


def warm_start(model: dict, pretrain_steps: int, stages: list[tuple[int, int]], lr: float = 1e-3,
               seed: int = 0, log_every: int = 0) -> dict:
    """Pre-train the plain baseline on the one-segment task with a 1-token prefix, copy its decoder into a fresh
    `model` (RMT / HMT: the same Decoder), then train `model` through `stages` as `train` does.
    Returns train()'s dict plus "backbone_loss" (the pre-trained backbone's held-out loss; the plateau is 0.35)."""
    _, backbone, backbone_loss = train_one_segment(BASELINE_FULL, 1, pretrain_steps, lr, seed, log_every=log_every)
    cfg = make_cfg(model, stages[0][0], 8, 1, lr, 32, 50)
    setup = setup_lib.build_setup(cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
    params = give_backbone(cfg, setup_lib.init_params(setup, seed), backbone)
    res = train(model, stages, lr=lr, seed=seed, log_every=log_every, train_extra={"min_lr_ratio": 1.0},
                params=params)
    return {**res, "backbone_loss": backbone_loss}


# ---- the recipe --------------------------------------------------------------------------------------------
# Segments of 8 tokens, 2 pairs, 16 keys, 16 values (chance 1/16), batches of 32 fresh documents.
# `full` is a curriculum [(n_segments, steps), ...] (each stage warm-started, fresh AdamW state and warmup);
# the last stage has 3 segments, so the query is 2 segments after the pairs. `ci` is the short version.
RECIPES = {
    "rmt": {"model": {"kind": "rmt", "rmt": {"num_mem_tokens": 8}}, "lr": 1e-3,
            "full": [(2, 500), (3, 1500)], "ci": [(2, 400), (3, 250)], "ci_min": 0.2},
    "hmt": {"model": {"kind": "hmt", "hmt": {"num_sensory": 8, "cache_size": 4, "recall_dim": 64}}, "lr": 1e-3,
            "full": [(2, 300), (3, 1200)], "ci": [(2, 200), (3, 100)], "ci_min": 0.4},
    "lm2": {"model": {"kind": "lm2", "lm2": {"num_slots": 8, "num_heads": 4}}, "lr": 3e-3,
            "full": [(3, 2000)], "ci": [(3, 1200)], "ci_min": 0.25},
}
# LM2's CI run was 800 steps until session 5, when unrolling the segment loop changed XLA's float rounding (the loss
# and gradient agree with the old program to 3e-8) and seed 0 landed at 17.3% instead of 41.6% (31.0% with the loop
# rolled): at 800 steps the "set" solution is still forming, and when is trajectory-dependent. With 1,200 steps,
# seeds 0 / 1 / 2: 48.7% / 68.1% / 38.6%; with position-routed writes (session 6) 52.0% (pytest) / 34.7% / 47.9%.
BASELINE = {"kind": "baseline", "segment_local": True}
BASELINE_FULL = {"kind": "baseline"}
CHANCE = 1 / 16


def run(kind: str, version: str) -> dict:
    r = RECIPES[kind]
    res = train(r["model"], r[version], lr=r["lr"], log_every=250 if version == "full" else 0)
    print(f"\nrecall {kind} {version}: stages {r[version]} lr {r['lr']}: acc {res['acc']:.3f} (per answer "
          f"{res['per_answer']}) after {res['steps']} "
          f"steps, train {res['train_s']:.0f} s, wall {res['wall_s']:.0f} s")
    return res


def test_recall_batch_layout():
    """Pairs only in segment 1, answers only in segment 3: the task the learning tests rely on."""
    corpus = AssociativeRecallCorpus(10, 3, 8, num_pairs=2, seed=0)
    b = recall_batch(corpus, 0, 4, 8)
    assert b["tokens"].shape == (4, 3, 8) and b["reset"][:, 0].all() and not b["reset"][:, 1:].any()
    assert b["loss_mask"][:, :2].sum() == 0 and (b["loss_mask"][:, 2].sum(-1) == 2).all()
    keys = (b["tokens"] >= corpus.key_base) & (b["tokens"] < corpus.value_base)
    assert (keys[:, 0].sum(-1) == 2).all() and not keys[:, 1].any()  # segment 2 is filler only
    answers = b["targets"][b["loss_mask"] > 0].reshape(4, 2)
    for row in range(4):  # every answer is a value stored in segment 1 (after its key)
        assert set(answers[row]) == set(b["tokens"][row, 0, 1:4:2])
    held = AssociativeRecallCorpus(10, 3, 8, num_pairs=2, seed=1)
    assert not np.array_equal(recall_batch(held, 0, 4, 8)["tokens"], b["tokens"])


@pytest.fixture(scope="module")
def baseline_ci() -> float:
    return train(BASELINE, [(3, 300)], lr=3e-3)["acc"]


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_recall_short(kind, baseline_ci):
    """CI: the short recipe is clearly above chance and above the segment-local baseline."""
    acc = run(kind, "ci")["acc"]
    print(f"baseline (segment-local) {baseline_ci:.3f}, chance {CHANCE:.3f}")
    assert baseline_ci <= 2 * CHANCE, baseline_ci
    assert acc >= RECIPES[kind]["ci_min"], acc
    assert acc >= baseline_ci + 0.1, (acc, baseline_ci)


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.xfail(reason="from scratch every model ends on the ~75% 'set, not binding' plateau of this backbone "
                   "(module docstring); the threshold is kept", strict=False)
@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_recall_full(kind):
    """Issue #3's >= 90% from scratch (the backbone learns binding and memory at once). Fails: every model ends
    on the ~75% plateau (see the module docstring); test_recall_full_warm_start is the recipe that passes."""
    assert run(kind, "full")["acc"] >= 0.90


# Warm-start recipe (see warm_start): pre-training steps of the backbone, then the memory model's stages.
# HMT keeps its two stages (2 segments: the pairs reach the query through its sensory memory; then 3).
# 6,000 pre-training steps (session 5): with 3,000, seed 1's backbone had not bound yet (loss 0.26; RMT then
# 89.4%, HMT 76.3%); with 6,000 its loss is 4e-5 and HMT reaches 95.2% (1-device process).
# LM2 (session 6, position-routed writes) learns the binding one segment away first, then carries it two segments;
# trained on 3 segments directly it stayed on the plateau (12,000 steps). With 4 memory heads of 16 dims 1 run in 6
# reached 90% within 6,000 steps (BENCHMARKS.md); with ONE head of 64 dims (closer to the paper's 2048 / 8 = 256 per
# head) the loss left the plateau in every run, after 3,500-9,500 steps, hence the long 2-segment stage.
WARM = {"rmt": (6000, [(3, 2000)]), "hmt": (6000, [(2, 500), (3, 3000)]), "lm2": (6000, [(2, 20000), (3, 5000)])}
WARM_MODEL = {"lm2": {"kind": "lm2", "lm2": {"num_slots": 8, "num_heads": 1}}}


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("kind", ["rmt", "hmt", "lm2"])
def test_recall_full_warm_start(kind):
    """Issue #3's >= 90% with the query 2 segments after the pairs, from a backbone that binds (warm_start).
    Measured with 6,000 pre-training steps (session 5) under pytest: RMT 96.8%, HMT 98.5%; HMT seed 1 95.2%
    (1-device process). With 3,000 (session 4): RMT 94.0%, HMT 73.6% under pytest but 96.1% in a 1-device
    process. LM2 (session 6, one memory head) under pytest: 99.9% (99.8 / 100), 15 min; seed 1 in a 1-device process
    92.6%; with 12,000 + 3,000 steps 95.8% (seed 1: 87.3%)."""
    pretrain, stages = WARM[kind]
    res = warm_start(WARM_MODEL.get(kind, RECIPES[kind]["model"]), pretrain, stages, log_every=500)
    print(f"\nrecall {kind} warm start: backbone loss {res['backbone_loss']:.3f}, stages {stages}: acc "
          f"{res['acc']:.3f} (per answer {res['per_answer']}), train {res['train_s']:.0f} s")
    assert res["backbone_loss"] < 0.1, res["backbone_loss"]  # the backbone binds (plateau 0.35)
    assert res["acc"] >= 0.90, res["acc"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_recall_full_warm_start_baseline_at_chance():
    """The segment-local baseline given the same pre-trained backbone still cannot see segment 1."""
    _, backbone, _ = train_one_segment(BASELINE_FULL, 1, WARM["rmt"][0], 1e-3)
    res = train(BASELINE, WARM["rmt"][1], lr=1e-3, train_extra={"min_lr_ratio": 1.0}, params=backbone)
    print(f"\nrecall baseline warm start: acc {res['acc']:.3f}")
    assert res["acc"] <= 2 * CHANCE, res["acc"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_recall_full_baseline_at_chance():
    """The segment-local baseline, trained as long as the longest full recipe, stays near chance."""
    steps = max(sum(n for _, n in r["full"]) for r in RECIPES.values())
    acc = train(BASELINE, [(3, steps)], lr=3e-3)["acc"]
    print(f"\nrecall baseline full: {steps} steps, acc {acc:.3f}")
    assert acc <= 2 * CHANCE, acc
