"""Learning through the CLI: RMT's associative-recall curriculum (issue #3), run as a user would.

tests/memory/test_recall_learning.py trains RMT, HMT and LM2 in-process (and has the CI versions). This
module replays RMT's full recipe from there (RECIPES["rmt"]: 2 segments, then 3 segments warm-started with
`train.init_from`) through `memlm train`, and scores it with memlm.eval.recall.recall_accuracy on held-out
documents, so the CLI path (data.source=assoc_recall, answer-only loss, warm start) is covered by the same
>= 90% bar. The segment-local baseline with the same schedule must stay near chance (1/16).
"""

import pytest

from tests.core.cli_utils import run_memlm
from tests.memory.test_recall_learning import BACKBONE, CHANCE, RECIPES

pytestmark = pytest.mark.slow

RMT = RECIPES["rmt"]
RECALL = [
    "configs/tiny/baseline.yaml", "data.source=assoc_recall", "data.segment_len=8", "data.recall_pairs=2",
    *(f"model.{k}={v}" for k, v in BACKBONE.items()), "model.n_kv_heads=0", "model.tie_embeddings=false",
    "train.batch_size=32", f"train.lr={RMT['lr']}", "train.warmup_steps=50", "train.weight_decay=0",
    "train.eval_every=0", "train.log_every=250", "train.progress=false",
    "data.synthetic_docs=1000000",  # fresh documents every step: no memorisation of a small training set
]
RMT_ARGS = ["model.kind=rmt", f"model.rmt.num_mem_tokens={RMT['model']['rmt']['num_mem_tokens']}"]
BASELINE_ARGS = ["model.kind=baseline", "model.segment_local=true"]


def _train(run_dir, *extra, timeout=3600):
    r = run_memlm("train", *RECALL, f"run.dir={run_dir}", f"train.checkpoint_every={10**6}", *extra,
                  timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def _accuracy(run_dir):
    import memlm
    from memlm.eval.recall import recall_accuracy

    return recall_accuracy(memlm.load(run_dir), n_docs=512)["accuracy"]


def test_rmt_recall_curriculum_cli_reaches_90(tmp_path):
    prev = None
    for i, (n_seg, steps) in enumerate(RMT["full"]):
        run_dir = str(tmp_path / f"rmt{i}")
        warm = [f"train.init_from={prev}"] if prev else []
        _train(run_dir, *RMT_ARGS, f"data.n_segments={n_seg}", f"train.steps={steps}", *warm)
        prev = run_dir
    base = str(tmp_path / "base")
    n_seg, total = RMT["full"][-1][0], sum(s for _, s in RMT["full"])
    _train(base, *BASELINE_ARGS, f"data.n_segments={n_seg}", f"train.steps={total}")
    acc_rmt, acc_base = _accuracy(prev), _accuracy(base)
    print(f"CLI curriculum recall {RMT['full']}: rmt {acc_rmt:.3f} baseline {acc_base:.3f} chance {CHANCE:.3f}")
    assert acc_rmt >= 0.90, acc_rmt
    assert acc_base <= 2 * CHANCE, acc_base
