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
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memlm.config import from_dict
from memlm.data.synthetic import AssociativeRecallCorpus
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
          log_every: int = 0, train_extra: dict | None = None) -> dict:
    """Train through `stages` [(n_segments, steps), ...] (a curriculum, warm-started), evaluate the last.
    train_extra: more train.* config keys (e.g. {"min_lr_ratio": 1.0} for a constant lr after warmup).

    Returns {"acc", "steps", "train_s", "wall_s"}.
    """
    t_start = time.perf_counter()
    params, train_s, doc, n_steps = None, 0.0, 0, 0
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
            "full": [(3, 2000)], "ci": [(3, 800)], "ci_min": 0.25},
}
BASELINE = {"kind": "baseline", "segment_local": True}
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
@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_recall_full(kind):
    """Issue #3: >= 90% answer accuracy with the query 2 segments after the pairs."""
    assert run(kind, "full")["acc"] >= 0.90


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_recall_full_baseline_at_chance():
    """The segment-local baseline, trained as long as the longest full recipe, stays near chance."""
    steps = max(sum(n for _, n in r["full"]) for r in RECIPES.values())
    acc = train(BASELINE, [(3, steps)], lr=3e-3)["acc"]
    print(f"\nrecall baseline full: {steps} steps, acc {acc:.3f}")
    assert acc <= 2 * CHANCE, acc
