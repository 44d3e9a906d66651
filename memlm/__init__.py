"""memlm: long-context memory transformers in JAX/Flax."""

__version__ = "0.1.0"


def load(run_dir: str, step: int | None = None, devices=None):
    """Load a trained run for inference; see memlm.api.LoadedModel."""
    from memlm.api import load as _load

    return _load(run_dir, step=step, devices=devices)
