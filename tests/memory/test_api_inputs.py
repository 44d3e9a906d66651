"""memlm.api.LoadedModel on edge-case input, for every kind the same: empty and one-token sequences give empty
results (memory kinds used to fail to concatenate zero segments), and ids outside the vocabulary, ragged rows
or text instead of ids are one-line UserErrors (out-of-vocabulary ids used to read the padded embedding rows)."""

import jax
import numpy as np
import pytest

from memlm.api import LoadedModel
from memlm.errors import UserError
from memlm.sharding import make_mesh
from memlm.train import setup as setup_lib
from tests.memory.common import make

KINDS = [("baseline", {}), ("rmt", {"rmt": {"num_mem_tokens": 2}}),
         ("titans", {"titans": {"variant": "mag", "chunk_size": 4, "window": 4}}),
         ("landmark", {"landmark": {"block_size": 4}}),
         ("memory_layers", {"memory_layers": {"layers": [1], "num_values": 64, "k_dim": 16, "top_k": 4,
                                              "heads": 2}})]


@pytest.fixture(scope="module", params=KINDS, ids=[k for k, _ in KINDS])
def lm(request):
    kind, extra = request.param
    cfg, _ = make(kind, **extra)
    setup = setup_lib.build_setup(cfg, make_mesh(1, 1, 1, jax.devices()[:1]), batch_size=1)
    return LoadedModel(cfg, setup_lib.init_params(setup, 0), setup, 0)


def test_empty_and_one_token_inputs(lm):
    v = lm.vocab_size
    assert lm.logits(np.zeros((2, 0), np.int32)).shape == (2, 0, v)
    assert lm.token_nll([[5]]).shape == (1, 0)
    assert lm.token_nll(np.zeros((2, 0), np.int32)).shape == (2, 0)
    full = lm.logits([[5, 6, 7]])  # the ordinary path still answers
    assert full.shape == (1, 3, v) and np.all(np.isfinite(full))


@pytest.mark.parametrize("tokens, needle", [
    ([[1, 2, 259]], "id 259 is outside the vocabulary [0, 259)"),
    ([[1, -1, 2]], "id -1 is outside the vocabulary"),
    ([[1, 2, 3], [1, 2]], "rows of different lengths"),
    ([[1.5, 2.0]], "expected integer token ids"),
])
def test_bad_token_ids_are_user_errors(lm, tokens, needle):
    for call in (lm.logits, lm.token_nll):
        with pytest.raises(UserError) as e:
            call(tokens)
        assert needle in str(e.value)
    with pytest.raises(UserError, match="expected integer token ids"):
        lm.generate("hello", 3)
    with pytest.raises(UserError, match="outside the vocabulary"):
        lm.generate([3, 400], 2)
