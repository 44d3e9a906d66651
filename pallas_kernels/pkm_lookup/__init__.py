"""Product-key memory lookup (Memory Layers at Scale, arXiv 2412.09764 §3; Lample et al. 2019 §3.2).

Per head: exact top-k over N = sqrt_n² product keys from the top-k of each sub-key half, float32
softmax, and an embedding bag that sums every head's weighted value rows.

Files: reference.py (dense over N, the spec; tests only), xla.py (production pure JAX, CPU default;
custom_vjp with a segment_sum values-gradient), triton.py (Pallas GPU, fused forward + fused backward),
tpu.py (Pallas Mosaic TPU), api.py (`pkm_lookup`: validation + dispatch), sharded.py
(`pkm_lookup_sharded`: values sharded by columns or rows under shard_map), bench.py (CPU timing/memory).
"""
from pallas_kernels.pkm_lookup.api import IMPLEMENTATIONS, check_args, pkm_lookup
from pallas_kernels.pkm_lookup.sharded import pkm_lookup_sharded
from pallas_kernels.pkm_lookup.xla import pkm_bag, pkm_lookup_xla, pkm_select

__all__ = ["IMPLEMENTATIONS", "check_args", "pkm_bag", "pkm_lookup", "pkm_lookup_sharded", "pkm_lookup_xla",
           "pkm_select"]
