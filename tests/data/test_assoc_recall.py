"""AssociativeRecallCorpus's in-window curriculum (data.recall_in_window)."""

import numpy as np
import pytest

from memlm.data.synthetic import AssociativeRecallCorpus

S, L, P = 2, 16, 2


def _pairs(doc: np.ndarray, c: AssociativeRecallCorpus) -> np.ndarray:
    """Indices of key/value tokens in the document."""
    return np.nonzero((doc >= c.key_base) & (doc < c.filler_base))[0]


def test_in_window_moves_the_pairs_into_the_query_segment_and_leaves_other_documents_alone():
    plain = AssociativeRecallCorpus(10**6, S, L, num_pairs=P, seed=3)
    mixed = AssociativeRecallCorpus(10**6, S, L, num_pairs=P, seed=3, in_window=0.5)
    q = plain._query_start()
    moved, offsets = 0, set()
    for i in range(400):
        a, b = plain.doc(i), mixed.doc(i)
        np.testing.assert_array_equal(plain.doc_loss_mask(i), mixed.doc_loss_mask(i))
        np.testing.assert_array_equal(a[q - 1 :], b[q - 1 :])  # marker, queries and answers unchanged
        if np.array_equal(a, b):
            continue
        moved += 1
        # segment 0 holds no key or value any more; the same k1 v1 k2 v2 sits in the last segment before the marker
        pos = _pairs(b[: q - 1], mixed)
        assert pos.min() >= (S - 1) * L and pos.max() < q - 1, (i, b)
        assert len(pos) == 2 * P and np.all(np.diff(pos) == 1), (i, b)
        offsets.add(int(pos[0]))
        np.testing.assert_array_equal(b[pos], a[: 2 * P])
        # the answers are still the values bound to the queried keys in that block
        block = dict(zip(b[pos][0::2], b[pos][1::2]))
        assert all(block[k] == v for k, v in zip(b[q : q + 2 * P : 2], b[q + 1 : q + 2 * P : 2]))
    assert 160 <= moved <= 240, moved  # ~ Binomial(400, 0.5)
    assert len(offsets) > 1  # a random offset, not one fixed position


def test_in_window_bounds():
    assert AssociativeRecallCorpus(8, S, L, num_pairs=P, in_window=1.0).doc(0) is not None
    for frac in (-0.1, 1.5):
        with pytest.raises(ValueError, match="in_window"):
            AssociativeRecallCorpus(8, S, L, num_pairs=P, in_window=frac)
    with pytest.raises(ValueError, match="4\\*num_pairs\\+1"):
        AssociativeRecallCorpus(8, S, 8, num_pairs=2, in_window=0.5)


@pytest.mark.parametrize("args, needle", [
    (["data.recall_pairs=2", "data.recall_in_window=0.5"], "4*num_pairs+1"),  # the in-window block does not fit
    (["data.recall_pairs=4", "data.recall_in_window=0"], "2*num_pairs+1"),    # the pairs alone do not fit
])
def test_cli_names_the_keys_when_the_segment_cannot_hold_the_document(tmp_path, args, needle):
    from tests.core.cli_utils import run_memlm

    r = run_memlm("train", "configs/tiny/baseline.yaml", "data.source=assoc_recall", "data.segment_len=8",
                  "data.n_segments=2", *args, "train.steps=1", f"run.dir={tmp_path / 'run'}", timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("memlm: error: data.recall_pairs="), r.stderr
    assert "data.recall_in_window" in lines[0] and "data.segment_len=8" in lines[0] and needle in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing written
