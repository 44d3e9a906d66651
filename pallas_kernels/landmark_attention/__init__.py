"""Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300): grouped-softmax attention kernels.

Files: reference.py (dense spec), xla.py (blockwise, CPU/default), triton.py (Pallas GPU via Triton),
tpu.py (Pallas TPU via Mosaic), api.py (dispatch), retrieval.py (top-k block retrieval for inference),
bench.py (xla vs dense time and memory on CPU).
"""
from .api import IMPLEMENTATIONS, landmark_attention, pallas_unsupported, resolve_implementation
from .reference import grouped_softmax_weights, landmark_attention_reference, landmark_weights_reference
from .retrieval import RETRIEVAL_MODES, retrieval_attention, select_blocks, stingy_positions

__all__ = [
    "IMPLEMENTATIONS",
    "RETRIEVAL_MODES",
    "grouped_softmax_weights",
    "landmark_attention",
    "landmark_attention_reference",
    "landmark_weights_reference",
    "pallas_unsupported",
    "resolve_implementation",
    "retrieval_attention",
    "select_blocks",
    "stingy_positions",
]
