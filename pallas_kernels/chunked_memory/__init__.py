"""Titans neural long-term memory (arXiv 2501.00663 §3.1-3.2): chunked update + retrieval.

Files: reference.py (token loop, the spec), xla.py (chunked parallel form, CPU), triton.py (GPU Pallas),
tpu.py (Mosaic TPU Pallas), api.py (`chunked_memory`: validation + dispatch), bench.py (CPU timing).
"""
from pallas_kernels.chunked_memory.api import chunked_memory

__all__ = ["chunked_memory"]
