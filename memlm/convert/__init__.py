"""Checkpoint conversion: export (params-only orbax, flat safetensors, Hugging Face) and import.

  safetensors_io  the safetensors file format (with bfloat16)
  flat            memlm params <-> flat per-layer names (decoder.blocks.3.attn.wq.kernel)
  hf              Hugging Face Llama / GPT-2 layouts <-> the memlm backbone
  tokenizer       HF GPT-2 BPE files <-> tiktoken ranks; SentencePiece passes through
  runs            `memlm export` / `memlm import` on run directories
"""
