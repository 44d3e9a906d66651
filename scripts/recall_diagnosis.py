"""Associative-recall diagnostics behind BENCHMARKS.md "Associative recall" (issue #3): does the backbone learn the
key/value binding at all, with and without tokens in front of the text, and does a memory model warm-started
from a backbone that binds learn to carry it?

Task and helpers are tests/memory/test_recall_learning.py's (2 pairs, 16 keys, 16 values, batch 32, constant lr
after a 50-step warmup). Modes:

  one-segment   the 3 x 8-token document as ONE 24-token segment (pairs and queries together: nothing to carry),
                with --prefix constant tokens in front (a BOS-like prefix; 0 = none). --model picks the model.
  warm-start    train the plain baseline as in one-segment (with --prefix), then copy its decoder into a fresh
                RMT (--model) and train that on --segments x 8 tokens (pairs in segment 1, queries in the last).
  mac-scratch   Titans-MAC from scratch on tests/memory/test_titans_learning.py's task (2 x 16 tokens, 2 pairs,
                batch 32) for --steps at a constant --lr; --model is JSON {"titans": {...}, "model": {...}}
                merged into that test's MAC; --in-window F trains on the curriculum where a fraction F of the
                documents has its pairs inside the query's segment. Prints held-out accuracy (512 documents, all
                pairs beyond the attention window, per answer).

  python scripts/recall_diagnosis.py one-segment --model '{"kind": "rmt", "rmt": {"num_mem_tokens": 8}}' \\
      --steps 3000 --lr 3e-3
  python scripts/recall_diagnosis.py one-segment --prefix 1 --steps 3000 --lr 1e-3
  python scripts/recall_diagnosis.py warm-start --prefix 1 --steps 3000 --memory-steps 4000 --lr 1e-3
  python scripts/recall_diagnosis.py mac-scratch --steps 8000 --lr 1e-3 --model '{"titans": {"num_persistent": 0}}'
  python scripts/recall_diagnosis.py mac-scratch --steps 10000 --lr 1e-3 --in-window 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlm.data.synthetic import AssociativeRecallCorpus  # noqa: E402
from memlm.errors import OneLineArgumentParser  # noqa: E402
from tests.memory import test_recall_learning as trl  # noqa: E402


def main() -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["one-segment", "warm-start", "mac-scratch"])
    p.add_argument("--model", default=None, help="model config JSON (one-segment: default baseline; warm-start: "
                   "the memory model, default RMT with 8 memory tokens)")
    p.add_argument("--prefix", type=int, default=0, help="constant tokens in front of the one-segment text "
                   "(warm-start: must be 1)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--memory-steps", type=int, default=4000)
    p.add_argument("--segments", type=int, default=2, help="warm-start: segments of 8 tokens (2 = 1-hop)")
    p.add_argument("--stages", default=None, help='warm-start: the memory model\'s curriculum as JSON, e.g. '
                   '"[[2, 500], [3, 3000]]" (overrides --segments / --memory-steps)')
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-window", type=float, default=0.0, help="mac-scratch: fraction of training documents "
                   "with the pairs in the query's segment (data.recall_in_window)")
    a = p.parse_args()
    if a.mode == "one-segment":
        model = json.loads(a.model) if a.model else {"kind": "baseline"}
        setup, params, loss = trl.train_one_segment(model, a.prefix, a.steps, a.lr, a.seed, log_every=500)
        # the streaming accuracy helper has no prefix: with one, the training loss is reported alone
        ev = {} if a.prefix else trl.accuracy(setup, params, AssociativeRecallCorpus(10**9, 3, 8, seed=1,
                                                                                    num_pairs=2), 24)
        print(json.dumps({"mode": a.mode, "model": model, "prefix": a.prefix, "steps": a.steps, "lr": a.lr,
                          "seed": a.seed, "final_loss": loss, **ev}))
        return 0
    if a.mode == "mac-scratch":
        return mac_scratch(json.loads(a.model) if a.model else {}, a.steps, a.lr, a.seed, a.in_window)
    if a.prefix != 1:
        p.error("warm-start pre-trains with --prefix 1 (tests/memory/test_recall_learning.py::warm_start)")
    model = json.loads(a.model) if a.model else trl.RECIPES["rmt"]["model"]
    stages = [tuple(x) for x in json.loads(a.stages)] if a.stages else [(a.segments, a.memory_steps)]
    res = trl.warm_start(model, a.steps, stages, a.lr, a.seed, log_every=500)
    print(json.dumps({"mode": a.mode, "model": model, "pretrain_steps": a.steps, "stages": stages, "lr": a.lr,
                      "seed": a.seed, "backbone_loss": res["backbone_loss"],
                      "acc": res["acc"], "per_answer": res["per_answer"]}))
    return 0


def mac_scratch(extra: dict, steps: int, lr: float, seed: int, in_window: float = 0.0) -> int:
    """Titans-MAC trained from scratch, constant lr after a 50-step warmup (the recall test uses 3e-3, cosine)."""
    from tests.memory import test_titans_learning as ttl
    from tests.memory.common import fit, recall_batch

    unknown = set(extra) - {"titans", "model"}
    if unknown:
        raise SystemExit(f"--model: unknown keys {sorted(unknown)} (expected 'titans' and/or 'model')")
    cfg = ttl.mac_config({**ttl.MAC, **extra.get("titans", {})}, steps, lr, 50, {"min_lr_ratio": 1.0},
                         extra.get("model", {}))
    train = AssociativeRecallCorpus(10**9, ttl.N_SEG, ttl.SEG, num_pairs=ttl.PAIRS, seed=seed, in_window=in_window)
    # training documents from index 10**7 on: never the held-out ones below, also when --seed is 1
    setup, params, metrics, train_s = fit(cfg, lambda i: recall_batch(train, 10**7 + i * ttl.BATCH, ttl.BATCH, ttl.SEG),
                                          seed, log_every=250, label="recall loss")
    held_out = AssociativeRecallCorpus(10**9, ttl.N_SEG, ttl.SEG, num_pairs=ttl.PAIRS, seed=1)
    ev = trl.accuracy(setup, params, held_out, ttl.SEG)
    print(json.dumps({"mode": "mac-scratch", "extra": extra, "steps": steps, "lr": lr, "seed": seed,
                      "in_window": in_window,
                      "final_loss": float(metrics["loss"]), "train_s": round(train_s, 1), **ev}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
