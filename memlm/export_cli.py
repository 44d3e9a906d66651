"""`memlm export` and `memlm import` (registered by memlm.cli through `add_export_import_commands`)."""

from __future__ import annotations

import argparse
import json

from memlm.errors import OneLineArgumentParser

OVERRIDES_HELP = "config overrides as key.path=value (e.g. model.kind=rmt data.source=synthetic)"

EXPORT_DESCRIPTION = """\
Export a run's checkpoint (latest, or --step).
  params       a params-only orbax checkpoint (a directory; restores onto any mesh)
  safetensors  one file of flat tensors named like decoder.blocks.3.attn.wq.kernel: the scanned layers are
               unstacked, one tensor per layer; the memlm config rides in the metadata
               (`memlm import safetensors FILE` rebuilds the run)
  hf           a Hugging Face dir: config.json + model.safetensors (LlamaForCausalLM, or GPT2LMHeadModel for
               model.arch=gpt2) for the backbone; the memory parameters (all the HF layout has no place for) in
               memory.safetensors, the memlm config in memlm.yaml, and a README.md on loading them
PATH must not exist unless --force."""

IMPORT_DESCRIPTION = """\
Make a run dir from a checkpoint. `memlm train RUN/config.yaml` then fine-tunes it and `memlm eval` evaluates.
Give train.batch_size and data.* here: the run dir's step-0 checkpoint holds the memory carry and the data
position for them."""

IMPORT_HF_DESCRIPTION = """\
A Hugging Face Llama or GPT-2 checkpoint dir (config.json + model.safetensors) becomes the backbone of any
model.kind; memory parameters are freshly initialised (run.seed). A tokenizer in the dir comes along
(tokenizer.model -> sentencepiece; GPT-2 tokenizer.json or vocab.json+merges.txt -> memlm's gpt2 ranks file),
copied into RUN/tokenizer/ with data.tokenizer/tokenizer_path pointing at it. A dir written by
`memlm export --format hf` also restores its memlm.yaml config and memory.safetensors (same model.kind)."""


class _IntermixedParser(OneLineArgumentParser):
    """Lets overrides follow options (`PATH --out DIR model.kind=rmt`): positionals may be intermixed."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def cmd_export(args) -> int:
    from memlm.convert.runs import export_run

    print(json.dumps(export_run(args.run, args.format, args.out, args.step, args.dtype, args.force)))
    return 0


def cmd_import_hf(args) -> int:
    from memlm.convert.runs import import_hf

    print(json.dumps(import_hf(args.path, args.out, args.overrides, args.force, args.no_tokenizer)))
    return 0


def cmd_import_safetensors(args) -> int:
    from memlm.convert.runs import import_safetensors

    print(json.dumps(import_safetensors(args.path, args.out, args.overrides, args.force)))
    return 0


def add_export_import_commands(subparsers) -> None:
    """Register `export` and `import` on the `memlm` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    e = subparsers.add_parser("export", help="export a checkpoint (params | safetensors | hf)",
                              description=EXPORT_DESCRIPTION, formatter_class=fmt)
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--format", required=True, choices=("params", "safetensors", "hf"))
    e.add_argument("--out", required=True, metavar="PATH", help="output file (safetensors) or directory")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the exported tensors (default float32)")
    e.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    e.set_defaults(func=cmd_export)

    i = subparsers.add_parser("import", help="make a run dir from a Hugging Face or memlm safetensors checkpoint",
                              description=IMPORT_DESCRIPTION, formatter_class=fmt)
    isub = i.add_subparsers(dest="import_command", required=True, metavar="FORMAT",
                            parser_class=_IntermixedParser)
    h = isub.add_parser("hf", help="a Hugging Face Llama / GPT-2 checkpoint dir as the backbone",
                        description=IMPORT_HF_DESCRIPTION, formatter_class=fmt)
    h.add_argument("path", metavar="PATH", help="checkpoint dir (config.json + model.safetensors)")
    h.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    h.add_argument("--force", action="store_true", help="replace DIR if it exists")
    h.add_argument("--no-tokenizer", action="store_true", help="ignore tokenizer files in PATH")
    h.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    h.set_defaults(func=cmd_import_hf)
    s = isub.add_parser("safetensors", help="a `memlm export --format safetensors` file",
                        description="Rebuild a run dir (step-0 checkpoint) from an exported safetensors file; "
                                    "its config comes from the file's metadata, then the overrides.")
    s.add_argument("path", metavar="FILE", help="the .safetensors file")
    s.add_argument("--out", required=True, metavar="DIR", help="run directory to create")
    s.add_argument("--force", action="store_true", help="replace DIR if it exists")
    s.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    s.set_defaults(func=cmd_import_safetensors)
