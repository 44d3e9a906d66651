"""`model.segment_remat` (the per-segment checkpoint of run_segments can be turned off) and `model.segment_unroll`
(the segment scan unrolled): each changes the program, not the loss or the gradient."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.memory.common import assert_same_loss_and_grads, dots_by_scan_depth, make, make_batch, model_loss

pytestmark = pytest.mark.unit

KINDS = [
    ("rmt", {"rmt": {"num_mem_tokens": 4}}),
    ("hmt", {"hmt": {"num_sensory": 4, "cache_size": 4, "recall_dim": 32}}),
    ("lm2", {"lm2": {"num_slots": 4, "num_heads": 2}}),
    ("titans", {"titans": {"variant": "mac", "memory_depth": 2, "memory_heads": 2, "chunk_size": 4,
                           "num_persistent": 2}}),
]


def _all_eqns(jaxpr):
    """Every equation of a jaxpr at any nesting depth (scan / cond / remat bodies included)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for j in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def _count_remat(jaxpr) -> int:
    """Checkpoint (remat) equations at any nesting depth."""
    return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in _all_eqns(jaxpr))


@pytest.mark.parametrize("kind,extra", KINDS, ids=[k for k, _ in KINDS])
def test_segment_remat_changes_the_program_not_the_gradient(kind, extra):
    grads, counts = {}, {}
    for flag in (True, False):
        cfg, model = make(kind, remat="full", segment_remat=flag, **extra)
        gd, params = nnx.split(model)
        loss = model_loss(gd, make_batch(cfg, seed=2))
        counts[flag] = _count_remat(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        grads[flag] = jax.grad(loss)(params)
    # one checkpoint per segment scan body more with segment_remat (the per-layer ones are in both)
    assert counts[True] > counts[False] > 0, counts
    # float32 programs that XLA fuses differently: equal up to rounding, judged per leaf relative to its norm
    # (titans' second-order backward reorders sums: ~1e-6 of the leaf's norm; a wrong gradient is O(1)), plus
    # a floor of 1e-8 of the whole gradient's norm for leaves whose gradient is itself rounding noise
    a_all = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads[True])]
    b_all = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads[False])]
    total = np.sqrt(sum(np.sum(b * b) for b in b_all))
    for a, b in zip(a_all, b_all, strict=True):
        err, ref = np.linalg.norm(a - b), np.linalg.norm(b)
        assert err <= 1e-5 * ref + 1e-8 * total, (err, ref, total)


def _scan_unrolls(jaxpr) -> list[int]:
    """The unroll parameter of every scan at any nesting depth."""
    return [e.params["unroll"] for e in _all_eqns(jaxpr) if e.primitive.name == "scan"]


@pytest.mark.parametrize("kind,extra", KINDS, ids=[k for k, _ in KINDS])
def test_segment_unroll_changes_the_program_not_the_loss(kind, extra):
    vals, unrolls = {}, {}
    for unroll in (False, True):
        cfg, model = make(kind, segment_unroll=unroll, **extra)
        gd, params = nnx.split(model)
        loss = model_loss(gd, make_batch(cfg, seed=2))
        unrolls[unroll] = _scan_unrolls(jax.make_jaxpr(loss)(params).jaxpr)
        vals[unroll] = jax.value_and_grad(loss)(params)
    assert 4 in unrolls[True] and 4 not in unrolls[False], unrolls  # the segment scan (4 segments) is unrolled
    # with the per-segment checkpoint the loop stays rolled (unrolled, XLA may recompute every segment up front)
    cfg, model = make(kind, segment_unroll=True, remat="full", **extra)
    gd, params = nnx.split(model)
    rolled = _scan_unrolls(jax.make_jaxpr(model_loss(gd, make_batch(cfg, seed=2)))(params).jaxpr)
    assert cfg.model.remat_segments and 4 not in rolled, rolled
    assert_same_loss_and_grads(vals[True], vals[False], kind)


def _titans_option_runs(variant: str, option: str, flags, program_stat) -> tuple[dict, dict]:
    """A tiny Titans model with model.titans.<option> set to each flag: ({flag: program_stat(loss, params)},
    {flag: (loss, grads)}) on one batch."""
    extra = {"titans": {**KINDS[3][1]["titans"], "variant": variant}}
    stats, vals = {}, {}
    for flag in flags:
        extra["titans"][option] = flag
        cfg, model = make("titans", segment_remat=False, **extra)
        gd, params = nnx.split(model)
        loss = model_loss(gd, make_batch(cfg, seed=3))
        stats[flag] = program_stat(loss, params)
        vals[flag] = jax.value_and_grad(loss)(params)
    return stats, vals


@pytest.mark.parametrize("variant", ["mag"])
def test_titans_chunk_remat_changes_the_program_not_the_gradient(variant):
    """`model.titans.chunk_remat: false` drops the per-chunk checkpoint of the XLA chunk loop: fewer checkpoints in
    the program, the same loss and gradients (float32 rounding)."""
    counts, vals = _titans_option_runs(variant, "chunk_remat", (True, False),
                                       lambda loss, params: _count_remat(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
    assert counts[True] > counts[False], counts
    assert_same_loss_and_grads(vals[True], vals[False], variant)


@pytest.mark.parametrize("variant", ["mag"])  # MAC's read-after-update order: test_parallel_retrieval_equals_reference
def test_titans_parallel_retrieval_changes_the_program_not_the_gradient(variant):
    """`model.titans.parallel_retrieval: true` moves the memory's retrievals out of the chunk loop: fewer matmuls
    in the innermost loop (the chunks'), as many in all, the same loss and gradients (float32 rounding)."""
    dots, vals = _titans_option_runs(variant, "parallel_retrieval", (False, True),
                                     lambda loss, params: dots_by_scan_depth(jax.make_jaxpr(loss)(params).jaxpr))
    inner = max(dots[False])
    assert dots[True][inner] < dots[False][inner], dots
    assert sum(dots[True].values()) == sum(dots[False].values()), dots
    assert_same_loss_and_grads(vals[False], vals[True], variant)
