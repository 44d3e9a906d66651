"""Run configuration: YAML validated by pydantic (extra="forbid"), `base:` inheritance, `a.b=c` overrides.

A config file is a YAML mapping. `base: other.yaml` (a path relative to the file) is loaded first and the
file's keys are deep-merged on top. Command-line overrides `train.steps=100` are applied last; their values
are parsed as YAML scalars. Any unknown key or bad value raises `UserError` naming the key path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memlm.errors import UserError, not_utf8

MODEL_KINDS = ("baseline", "rmt", "hmt", "lm2", "titans", "landmark", "memory_layers")


INT32_MAX = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _finite_and_int32(cls, value):
        """Every number of every section: floats finite (an inf learning rate passes `gt=0` and diverges at the
        first step), integers within int32 (sizes and seeds reach jax and numpy as int32)."""
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT32_MAX:
                raise ValueError(f"{v} is out of range (at most {INT32_MAX} in magnitude)")
        return value


class RunConfig(_Strict):
    dir: str = "runs/default"
    seed: int = Field(0, ge=0)
    name: str = ""


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0 disables the periodic eval loss")
    eval_batches: int = Field(2, ge=1)
    max_checkpoints: int = Field(3, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    lr_decay: Literal["cosine", "linear"] = Field(
        "cosine", description="after warmup, decay to lr * min_lr_ratio at train.steps: cosine, or linear (RMT's "
        "BABILong recipe and Memory+ use linear)")
    weight_decay: float = Field(0.1, ge=0)
    b1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay")
    b2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay")
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global-norm clip; 0 disables")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    bptt_depth: int = Field(-1, description="-1 = full BPTT (default); k >= 1 cuts the gradient through the "
                            "memory every k segments (blocks, not a sliding window: models/segments.py)")
    async_checkpoint: bool = True
    init_from: str | None = Field(
        None, description="warm start: params of the latest checkpoint of this run dir (curriculum stages)"
    )
    progress: bool = True


class RMTConfig(_Strict):
    """Recurrent Memory Transformer (Bulatov et al. 2022, decoder form of Bulatov et al. 2023)."""

    num_mem_tokens: int = Field(16, ge=0, description="m memory tokens; 0 disables memory (= segment-local)")
    write_positions: Literal["pinned", "after_segment"] = Field(
        "pinned",
        description="pinned: write tokens sit at the last m positions of model.max_seq_len, so they never move "
        "with segment length; after_segment: right after the segment (the official code)",
    )


class HMTConfig(_Strict):
    """Hierarchical Memory Transformer (He et al. 2024, arXiv 2405.06067); defaults from models.md §3(d)."""

    num_sensory: int = Field(32, ge=0, description="k tokens of the previous segment re-embedded (sensory memory)")
    cache_size: int = Field(100, ge=1, description="N cached memory embeddings searched by recall")
    recall_dim: int = Field(4096, ge=1, description="d_h of the recall query/key projections")
    sum_fraction: float = Field(0.5, gt=0, le=1, description="fraction of the segment summarised")
    stage: Literal[1, 2] = Field(2, description="1: RMT + sensory memory, no recall; 2: with memory recall")
    loss_segments: Literal["all", "last"] = Field(
        "all", description="CE on every segment's tokens (default: the LM objective over the whole sample) or on "
        "the last segment only (the official code's mask, models.md §3(b))"
    )
    extract_from: Literal["previous_segment", "current_segment"] = Field(
        "previous_segment",
        description="tokens summarised into the recall query: the last sum_fraction*L tokens of the previous "
        "segment (causal, default) or the first sum_fraction*L tokens of the current segment (paper and "
        "official code; the recalled memory then depends on later tokens of the same segment)",
    )


class LM2Config(_Strict):
    """LM2 (Kang et al. 2025, arXiv 2502.06049), the paper's formulation with causal gates."""

    num_slots: int = Field(2048, ge=1, description="N memory slots per sequence")
    num_heads: int = Field(8, ge=1)
    top_k: int = Field(0, ge=0, description="optional top-k over slots in the read (0 = all)")
    gate_mode: Literal["causal", "sequence_mean_leaky"] = Field(
        "causal",
        description="causal per-token gates (default) or the official code's sequence-mean gate, which leaks "
        "future tokens into earlier positions",
    )
    write_routing: Literal["position", "read_weights"] = Field(
        "position",
        description="how a segment's T per-token updates map onto the N slots: by position (the official code's "
        "time-to-slot resampling, done at the segment's end: causal; default) or by each token's read weights",
    )
    bank: Literal["per_block", "shared"] = Field(
        "per_block",
        description="per_block (default): every block keeps its own bank across segments ([B, n_layers, N, d]); "
        "shared: one bank per sequence threads through the blocks as in the paper's M_t -> M_{t+1} and the "
        "official code ([B, N, d]): every block reads the segment-start bank and the writes chain block to block",
    )


class TitansConfig(_Strict):
    """Titans neural long-term memory (Behrouz et al. 2025, arXiv 2501.00663)."""

    variant: Literal["mac", "mag", "mal"] = "mac"
    memory_depth: int = Field(2, description="L_M layers of the memory MLP (>= 1)")
    memory_expansion: int = Field(2, ge=1, description="hidden width of deep memory = expansion * head dim")
    memory_heads: int = Field(1, ge=1)
    chunk_size: int = Field(16, ge=1, description="tokens per parallel chunk of the memory update")
    gates: Literal["per_token", "per_chunk"] = Field(
        "per_token", description="theta/eta/alpha per token, or per chunk (those of the chunk's first token: causal)")
    num_persistent: int = Field(4, ge=0, description="N_p learned persistent memory tokens")
    num_longterm: int = Field(0, ge=0, description="MAC: 0 = one retrieved token per segment token (the paper); "
                              "N > 0 = N learned queries retrieved from the memory, visible to the whole segment")
    persistent_write: bool = Field(
        False, description="MAG/MAL: the paper's x~ = [P || x] (eq. 26 / 29): at every document start each layer's "
        "N_p persistent tokens go through its memory first (token by token: momentum, conv tails and M start where "
        "P left them), and MAL's attention sees P only as the first window's positions (the memory layer's "
        "outputs for P), not as a prefix. false (default, the form every benchmark used): P is a prefix of "
        "every query's attention and the memory starts at M_0 with zero momentum")
    window: int = Field(64, ge=1, description="MAG/MAL sliding-window attention size")
    max_lr: float = Field(0.1, gt=0, description="bound on the inner learning rate theta (theta = max_lr * "
                          "sigmoid). Stability: inside a chunk all gradients use the chunk-start weights, so for "
                          "similar keys a chunk moves M by ~theta*chunk_size/(1-eta) gradients; keep that below ~1 "
                          "(e.g. 0.02 for chunk 16, 0.1 for chunk 4)")
    conv_kernel: int = Field(4, ge=1, description="depthwise conv width after the q/k/v projections")
    normalize_values: bool = Field(
        False, description="l2-normalise v like q and k (NOT in the paper): bounds the inner targets and so the "
        "deep memory's weights and curvature, which keeps the inner gradient steps stable")
    inner_grad_clip: float = Field(
        0.0, ge=0, description="if > 0, each token's inner gradient grad loss(M; x_t) (all memory layers together) "
        "is rescaled to Frobenius norm <= this before the momentum update (NOT in the paper, which bounds only "
        "theta; 0 = the paper's rule): keeps large inner steps and deep memories from diverging. The paper's "
        "chunked rule can overshoot without bound on a run of near-identical tokens (b gradients taken at one "
        "point) and when a long stream grows the deep memory's curvature; the clip bounds ||S|| by "
        "max_lr * clip / (1 - eta)")
    scan_unroll: int = Field(
        1, ge=1, description="chunks per iteration of the XLA chunk loop (lax.scan unroll; the Pallas kernels "
        "ignore it): unrolling trades compile time and ~8% memory for speed; a fully unrolled 512-token segment made "
        "a MAG step 8-12% faster on an H200, no measured effect on CPU")
    chunk_remat: bool = Field(
        True, description="checkpoint each chunk of the XLA chunk loop (models.md §2: activation memory grows as "
        "#chunks x |M|, so remat per chunk; the default). false keeps every chunk's intermediates for the backward "
        "instead of recomputing them: one forward pass of the memory fewer per step for more memory; slower on CPU "
        "and on an H200 (d512 MAG 3-10%, 1.5x the temporaries; the Pallas kernels ignore it)")
    parallel_retrieval: bool = Field(
        False, description="XLA chunk loop: carry only the memory state through the chunks (keys' gradients and the "
        "M, S update) and run every chunk's retrieval after the loop, all chunks at once, as chunked linear attention "
        "does; the same values, fewer sequential kernels (a depth-2 chunk step: 15 -> 7 matmuls) for one more copy of "
        "the per-chunk weights; slower on CPU, no faster on an H200 (d512 MAG 0.4-2.6% slower; the Pallas kernels "
        "ignore it)")
    memory_layers: list[int] | None = Field(None, description="layers with memory (None = all)")
    pipeline_layers: bool = Field(
        False, description="training: run the (layer, segment) grid by anti-diagonals, all layers of a wave in one "
        "vmapped call (n_segments + n_layers - 1 sequential block calls instead of n_segments x n_layers; the same "
        "values: memlm/memory/titans_pipeline.py). For accelerators, where MAG's step is bound by small per-chunk "
        "kernels; needs every layer to have a memory (or none). Holds up to n_layers layers' activations at once "
        "and does not apply segment_remat to the layers (tiny MAG, remat=full: 2.6x the temporaries; the 760M "
        "paper MAG 91 vs 42 GiB per device); pipeline_group bounds that")
    pipeline_group: int = Field(
        0, ge=0, description="with pipeline_layers: at most this many layers per batched block call inside a wave "
        "(0 = all of the wave's active layers in one call). Smaller groups hold fewer layers' activations at once "
        "(attention scores above all) for more sequential calls: a wave of k layers makes ceil(k / group)")
    implementation: Literal["auto", "xla", "reference", "triton", "mosaic"] = Field(
        "auto", description="chunked-memory kernel (auto: Pallas on GPU/TPU where supported, else XLA; deep "
        "memory stays on XLA under auto (its Triton kernel was no faster on an H200 where it fit; Mosaic is "
        "unmeasured), 'triton' or 'mosaic' selects them; shapes a Triton kernel was not measured to fit in "
        "shared memory run on XLA with a log line; reference: the token loop, for tests)"
    )


class LandmarkConfig(_Strict):
    """Landmark attention (Mohtashami & Jaggi 2023, arXiv 2305.16300)."""

    block_size: int = Field(50, ge=1, description="b regular tokens per block; a landmark follows each block")
    include_landmark_in_loss: bool = False
    top_k: int = Field(4, ge=1, description="retrieved blocks at inference")
    retrieval_mode: Literal["per_token_and_head", "max_over_heads", "max_over_tokens"] = "per_token_and_head"
    cache_blocks: int = Field(4096, ge=1, description="blocks held in the inference KV cache")
    offload_kv: bool = Field(False, description="retrieval inference (memlm.load / eval pg19 / babilong) keeps the "
                             "K/V cache in host memory, only landmark keys on device; training ignores it")

    @model_validator(mode="after")
    def _check(self) -> LandmarkConfig:
        if self.top_k > self.cache_blocks:
            raise ValueError(f"top_k ({self.top_k}) exceeds cache_blocks ({self.cache_blocks}); retrieval picks "
                             "top_k blocks out of the cache")
        return self


class MemoryLayersConfig(_Strict):
    """Product-key memory layers (Lample et al. 2019) and Memory+ (Berges et al. 2024, arXiv 2412.09764)."""

    layers: list[int] = Field(default_factory=lambda: [1], description="layers whose FFN becomes a memory")
    num_values: int = Field(1024 * 1024, ge=1, description="N values (a perfect square)")
    heads: int = Field(4, ge=1)
    top_k: int = Field(32, ge=1)
    k_dim: int = Field(512, ge=2)
    value_dim: int = Field(0, ge=0, description="0 = d_model")
    memory_plus: bool = Field(True, description="shared value pool + SiLU-gated output (swilu)")
    qk_norm: bool = False
    value_lr: float = Field(1e-3, gt=0, description="learning rate of the values (own optimizer group)")
    value_weight_decay: bool = Field(
        True, description="apply train.weight_decay to the values too, as the official code does (one AdamW "
        "over every group; models.md §6(g)); false exempts them")
    value_sharding: Literal["columns", "rows"] = Field(
        "columns", description="which dim of the values is split over the mesh axis of rule pkm_value_dim"
    )
    implementation: Literal["auto", "xla", "reference", "triton", "mosaic"] = Field(
        "auto", description="lookup kernel when unsharded (auto: Mosaic on TPU, XLA on GPU and CPU; the Triton "
        "kernel measured slower than XLA on an H200, choose it with 'triton')"
    )
    chunk_len: int = Field(
        0, ge=0, description="sequence positions per lookup chunk (lax.map over chunks bounds the XLA bag's "
        "[tokens, heads*top_k, v_dim] temporaries); 0 = the whole sequence at once"
    )


# Options that change how a step is computed (schedule, kernel, what is recomputed), not its values beyond float
# rounding nor its parameters: a run may resume, and an exported memory be imported, with them changed.
SCHEDULE_ONLY_KEYS = frozenset({
    "model.attention_impl", "model.attention_q_block", "model.remat", "model.segment_remat", "model.segment_unroll",
    "model.titans.scan_unroll", "model.titans.chunk_remat", "model.titans.parallel_retrieval",
    "model.titans.pipeline_layers",
    "model.titans.pipeline_group", "model.titans.implementation", "model.memory_layers.implementation",
    "model.landmark.offload_kv",
})


def config_differences(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) of every leaf where two config dumps differ, SCHEDULE_ONLY_KEYS skipped.
    A section set on one side only (a dict against None) is one difference at the section's key."""
    if prefix in SCHEDULE_ONLY_KEYS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in config_differences(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [(prefix, a, b)]


MEMORY_SECTIONS = {"rmt": "rmt", "hmt": "hmt", "lm2": "lm2", "titans": "titans", "landmark": "landmark",
                   "memory_layers": "memory_layers"}


class ModelConfig(_Strict):
    kind: Literal[MODEL_KINDS] = "baseline"  # type: ignore[valid-type]
    arch: Literal["llama", "gpt2"] = Field(
        "llama",
        description="backbone: llama (RMSNorm, RoPE, SwiGLU, no biases) or gpt2 (LayerNorm with bias, learned "
        "absolute positions for max_seq_len positions, tanh-GELU MLP of width d_ff, biases everywhere; "
        "the layout of imported GPT-2 checkpoints)",
    )
    vocab_size: int = Field(259, ge=2)
    vocab_pad_multiple: int = Field(128, ge=1, description="embedding rows are padded to a multiple of this")
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(0, ge=0, description="0 = same as n_heads (MHA); fewer = grouped-query")
    head_dim: int = Field(0, ge=0, description="0 = d_model // n_heads")
    d_ff: int = Field(0, ge=0, description="0 = 8/3 * d_model rounded to 8")
    max_seq_len: int = Field(2048, ge=1, description="longest sequence the attention backbone accepts")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = False
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "full"
    segment_remat: bool = Field(
        True,
        description="segment-recurrent models (rmt, hmt, lm2, titans): also checkpoint each whole segment, so "
        "only the carry is kept between segments (activation memory independent of the number of segments). "
        "With a per-layer remat it recomputes each segment's forward once more (~1.25x the step's FLOPs); "
        "false keeps the per-layer residuals of every segment instead (the baseline's footprint). Ignored "
        "when remat=none",
    )
    segment_unroll: bool = Field(
        True,
        description="segment-recurrent models: unroll the lax.scan over segments into straight-line code (the "
        "same math). On an H200 the rolled loop cost 1.46-1.60x the segment-local baseline's step for the loop "
        "alone, unrolled 1.07-1.14x (BENCHMARKS.md). Not applied while segment_remat checkpoints the segments: "
        "unrolled, the compiler may schedule every segment's recomputation early and keep them all alive (RMT "
        "paper config: 22.0 vs 3.1 GiB per device). Compile time grows with the number of segments",
    )
    attention_impl: Literal["xla", "reference"] = "xla"
    attention_q_block: int = Field(
        0, ge=0, description="compute attention this many queries at a time (lax.map over query blocks, each "
        "recomputed in the backward): the same values, with one block's float32 scores alive at a time instead of "
        "the whole [batch, heads, queries, keys] array; 0 = all queries at once (the default). Applies to the shared "
        "attention and Titans' persistent-prefix attention; landmark attention has its own blockwise kernel")
    segment_local: bool = Field(
        False, description="baseline only: attend within each segment instead of the whole sequence"
    )
    init_std: float = Field(0.02, gt=0)
    rmt: RMTConfig | None = None
    hmt: HMTConfig | None = None
    lm2: LM2Config | None = None
    titans: TitansConfig | None = None
    landmark: LandmarkConfig | None = None
    memory_layers: MemoryLayersConfig | None = None

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def remat_segments(self) -> bool:
        """Whether run_segments checkpoints each segment (segment_remat, unless remat=none)."""
        return self.segment_remat and self.remat != "none"

    @property
    def unroll_segments(self) -> bool:
        """Whether run_segments unrolls the segment loop (segment_unroll, unless segments are checkpointed)."""
        return self.segment_unroll and not self.remat_segments

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff(self) -> int:
        return self.d_ff or (int(8 * self.d_model / 3) + 7) // 8 * 8

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.hd % 2:
            raise ValueError(f"head dim ({self.hd}) must be even for RoPE")
        for section, kind in MEMORY_SECTIONS.items():
            if getattr(self, section) is not None and self.kind != kind:
                raise ValueError(f"model.{section} is set but model.kind is {self.kind!r}")
        if self.kind in MEMORY_SECTIONS.values():
            section = next(k for k, v in MEMORY_SECTIONS.items() if v == self.kind)
            if getattr(self, section) is None:
                object.__setattr__(self, section, self.model_fields[section].annotation.__args__[0]())
        return self


class BabilongDataConfig(_Strict):
    """`data.source=babilong`: generated BABILong samples, loss on the answer only (RMT's fine-tuning recipe).

    `data.path` holds the PG-19-layout books for background text (train split for training, validation for
    eval loss). Curriculum: run stages with growing `lengths` (and `data.n_segments`), each warm-started from
    the previous stage with `train.init_from`.
    """

    tasks: list[str] = Field(default_factory=lambda: ["qa1"])
    lengths: list[str] = Field(default_factory=lambda: ["0k", "1k"])
    samples_per_cell: int = Field(256, ge=1)
    seed: int = Field(1, description="generator seed (evaluation uses 0, so train and eval samples differ)")
    gpt2_tokenizer: str | None = Field(None, description="tiktoken GPT-2 file to count lengths as BABILong does")


class DataConfig(_Strict):
    source: Literal["books", "text_dir", "pg19", "synthetic", "assoc_recall", "babilong"] = "books"
    path: str = "data/books"
    tokenizer: Literal["bytes", "sentencepiece", "gpt2"] = "bytes"
    tokenizer_path: str | None = None
    n_segments: int = Field(1, ge=1)
    segment_len: int = Field(128, ge=1)
    eval_split: str = "validation"
    cache_dir: str | None = None
    vary_n_segments: bool = Field(
        False, description="each batch uses n ~ U{1..n_segments} segments, drawn from (run.seed, step)"
    )
    recall_pairs: int = Field(4, ge=1, description="assoc_recall: key/value pairs in the first segment")
    recall_in_window: float = Field(
        0.0, ge=0.0, le=1.0, description="assoc_recall, training split only: the fraction of documents whose pairs "
        "sit in the last segment, within attention's reach (a curriculum; evaluation keeps every pair beyond it)")
    synthetic_docs: int = Field(4096, ge=1, description="synthetic / assoc_recall: documents per split")
    babilong: BabilongDataConfig = Field(default_factory=BabilongDataConfig)


class MeshConfig(_Strict):
    data: int = Field(-1, description="-1 = all remaining devices")
    fsdp: int = Field(1, ge=1)
    tensor: int = Field(1, ge=1)
    rules: dict[str, list[str] | str | None] = Field(
        default_factory=dict, description="overrides of the logical-axis rules table"
    )

    @model_validator(mode="after")
    def _check_rules(self) -> MeshConfig:
        for logical, axes in self.rules.items():
            if isinstance(axes, list) and len(set(axes)) != len(axes):
                raise ValueError(f"mesh.rules.{logical} = {axes} names a mesh axis twice")
        return self


class DistributedConfig(_Strict):
    enabled: bool = Field(False, description="call jax.distributed.initialize")
    coordinator_address: str | None = None
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)
    local_device_count: int | None = Field(None, ge=1, description="CPU only: fake devices per process")
    initialization_timeout: int = Field(120, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if self.process_id is not None and self.num_processes is not None and self.process_id >= self.num_processes:
            raise ValueError(f"distributed.process_id ({self.process_id}) must be < distributed.num_processes "
                             f"({self.num_processes})")
        return self


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @property
    def seq_len(self) -> int:
        return self.data.n_segments * self.data.segment_len

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.model.kind in ("baseline", "memory_layers"):  # one attention over the whole sequence
            span = self.data.segment_len if self.model.segment_local else self.seq_len
            if span > self.model.max_seq_len:
                raise ValueError(
                    f"data.n_segments*data.segment_len = {span} exceeds model.max_seq_len = "
                    f"{self.model.max_seq_len}; model.kind={self.model.kind} has no recurrent memory (use a "
                    "memory model or model.segment_local=true)"
                )
        if self.model.segment_local and self.model.kind not in ("baseline", "memory_layers"):
            raise ValueError(f"model.segment_local applies to model.kind=baseline / memory_layers (one attention over "
                             f"the sequence), not {self.model.kind}, whose attention is per segment already")
        if self.train.batch_size % self.train.grad_accum:
            raise ValueError(f"train.grad_accum ({self.train.grad_accum}) does not divide train.batch_size "
                             f"({self.train.batch_size})")
        if self.train.bptt_depth == 0 or self.train.bptt_depth < -1:
            raise ValueError(f"train.bptt_depth must be -1 (full BPTT) or >= 1, got {self.train.bptt_depth}")
        if self.model.kind == "rmt":
            need = self.data.segment_len + 2 * self.model.rmt.num_mem_tokens
            if need > self.model.max_seq_len:
                raise ValueError(
                    f"data.segment_len ({self.data.segment_len}) + 2*model.rmt.num_mem_tokens does not fit "
                    f"model.max_seq_len ({self.model.max_seq_len})"
                )
        m = self.model
        if m.kind == "titans":
            if m.titans.memory_depth < 1:
                raise ValueError("model.titans.memory_depth must be >= 1 (the paper's memory is an MLP)")
            if self.data.segment_len % m.titans.chunk_size:
                raise ValueError(f"model.titans.chunk_size ({m.titans.chunk_size}) does not divide "
                                 f"data.segment_len ({self.data.segment_len})")
            if self.data.segment_len > m.max_seq_len:
                raise ValueError(f"data.segment_len ({self.data.segment_len}) exceeds model.max_seq_len "
                                 f"({m.max_seq_len}); Titans attends within a segment, the memory carries the rest")
            if m.titans.num_longterm and m.titans.variant != "mac":
                raise ValueError(f"model.titans.num_longterm ({m.titans.num_longterm}) is a MAC option (retrieved "
                                 f"tokens in its attention); variant {m.titans.variant} has none")
            if m.titans.conv_kernel > self.data.segment_len:
                raise ValueError(f"model.titans.conv_kernel ({m.titans.conv_kernel}) exceeds data.segment_len "
                                 f"({self.data.segment_len}): the short conv reaches one segment back at most")
            if m.titans.pipeline_group and not m.titans.pipeline_layers:
                raise ValueError("model.titans.pipeline_group is set but model.titans.pipeline_layers is false")
        if m.kind == "landmark" and self.data.segment_len % m.landmark.block_size:
            raise ValueError(f"model.landmark.block_size ({m.landmark.block_size}) does not divide "
                             f"data.segment_len ({self.data.segment_len})")
        if m.kind == "landmark" and m.arch == "gpt2":
            inserted = self.data.segment_len // m.landmark.block_size * (m.landmark.block_size + 1)
            if inserted > m.max_seq_len:
                raise ValueError(f"model.max_seq_len ({m.max_seq_len}) is smaller than a landmark segment "
                                 f"({inserted} positions = data.segment_len with its landmarks): arch=gpt2 gives "
                                 "each of them a learned position")
        if m.kind == "memory_layers":
            ml = m.memory_layers
            root = int(round(ml.num_values**0.5))
            if root * root != ml.num_values:
                raise ValueError(f"model.memory_layers.num_values ({ml.num_values}) is not a perfect square")
            if ml.top_k > root:
                raise ValueError(f"model.memory_layers.top_k ({ml.top_k}) exceeds sqrt(num_values) ({root})")
            bad = [i for i in ml.layers if not 0 <= i < m.n_layers]
            if bad:
                raise ValueError(f"model.memory_layers.layers {bad} out of range for model.n_layers={m.n_layers}")
            if len(set(ml.layers)) != len(ml.layers):
                raise ValueError(f"model.memory_layers.layers {ml.layers} lists a layer twice")
        if self.data.tokenizer == "bytes" and self.model.vocab_size < 259:
            raise ValueError("model.vocab_size must be >= 259 for the byte tokenizer")
        return self


# ----------------------------------------------------------------------------------------------------------


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"{path}: circular `base:` inheritance")
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith(" ")]
        raise UserError(f"{path}: invalid YAML: {lines[-1] if lines else e}") from None
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: base: expected the path of a config file, got {base!r}")
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        raw = _deep_merge(_read_yaml(base_path, seen + (path,)), raw)
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides; values parse as YAML scalars (`1e-3`, `true`, `[1,2]`)."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"override {item!r}: empty key")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = raw
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is not None and not isinstance(child, dict):  # a section given as a scalar: not ours to drop
                raise UserError(f"override {item!r}: {'.'.join(parts[:i + 1])} is {child!r}, not a mapping")
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = parsed
    return raw


def _format_validation_error(e: ValidationError, source: str, overrides: list[str] = ()) -> str:
    """'SOURCE: key.path: message', SOURCE the command-line override that set the key when one did. Errors of
    a whole-config check (no key path) name their keys in the message."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if loc and (loc == key or loc.startswith(key + ".")):
            source = f"override {o}"
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def from_dict(raw: dict, source: str = "config", overrides: list[str] = ()) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, source, overrides)) from None


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with `base:`), apply overrides, validate. Raises UserError on any problem."""
    raw = _read_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw, source=path or "config", overrides=overrides or [])


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_absolute_paths(cfg: Config) -> Config:
    """cfg with its file and directory paths made absolute (against the working directory), so that a run's
    config.yaml reads the same from anywhere (`memlm eval --run` from another directory)."""
    def absolute(section, *keys):
        return section.model_copy(update={k: os.path.abspath(getattr(section, k)) for k in keys
                                          if getattr(section, k)})

    return cfg.model_copy(update={"run": absolute(cfg.run, "dir"), "train": absolute(cfg.train, "init_from"),
                                  "data": absolute(cfg.data, "path", "tokenizer_path", "cache_dir")})


def save_config(cfg: Config, path: str) -> None:
    """A run dir's config.yaml (paths made absolute)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(with_absolute_paths(cfg)))
    os.replace(tmp, path)


def read_run_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: not a memlm run directory (no config.yaml)")
    return load_config(path)


def config_field_help() -> list[tuple[str, str, Any]]:
    """(key path, type, default) for every config key, for `--help` and the README."""
    rows: list[tuple[str, str, Any]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif sub:  # an optional memory section: listed with its own defaults
                walk(sub[0], f"{prefix}{name}.")
            else:
                default = field.default_factory() if field.default_factory else field.default
                typ = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
                if typ == "Literal":
                    typ = " | ".join(repr(a) for a in ann.__args__)
                rows.append((f"{prefix}{name}", typ, default))

    walk(Config, "")
    return rows
