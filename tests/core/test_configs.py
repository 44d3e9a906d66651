"""Every shipped config loads and validates (unknown keys, cross-key checks), so a typo in one cannot wait for
a user to find it; `memlm compile` fit checks of the paper configs are in BENCHMARKS.md."""

import glob
import os

import pytest

from memlm.config import load_config
from tests.core.cli_utils import ROOT

pytestmark = pytest.mark.unit

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 20 and "configs/paper/rmt_gpt2_small.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path):
    cfg = load_config(os.path.join(ROOT, path), [])
    # the file is named after its model (Memory+ is model.kind memory_layers)
    assert cfg.model.kind in os.path.basename(path).replace("memory_plus", "memory_layers"), (path, cfg.model.kind)
