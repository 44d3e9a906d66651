"""Titans neural long-term memory (arXiv 2501.00663 §3.1-3.2): chunked update + retrieval.

Files: reference.py (token loop, the spec), xla.py (chunked parallel form, CPU), triton.py (GPU Pallas,
linear memory), triton_deep.py (GPU Pallas, depth >= 2), tpu.py / tpu_deep.py (Mosaic TPU Pallas, the same
split), api.py (`chunked_memory`: validation + dispatch), bench.py (CPU timing).
"""
from pallas_kernels.chunked_memory.api import chunked_memory

__all__ = ["chunked_memory"]
