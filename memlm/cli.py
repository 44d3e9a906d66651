"""The `memlm` command: train | eval | data | compile (| export | import when available).

Every user error (bad config key, missing data, mismatched checkpoint, ...) is printed as one line
`memlm: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from memlm import errors
from memlm.errors import NonFiniteOutput, OneLineArgumentParser, TrainingDiverged, UserError, check_output_file

OVERRIDES_HELP = "config overrides as key.path=value (e.g. train.steps=100 mesh.data=8)"


def _quiet() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("absl", "orbax", "jax._src", "tensorflow", "etils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def _load(args):
    from memlm.config import load_config

    return load_config(args.config, args.overrides)


# ---- train -------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    cfg = _load(args)
    from memlm.train.loop import train

    result = train(cfg)
    print(json.dumps({k: v for k, v in result.items()}, default=float))
    return 0


# ---- eval --------------------------------------------------------------------------------------------------
def cmd_eval_lm(args) -> int:
    from memlm.eval.lm import eval_lm

    if args.out:
        check_output_file(args.out, "--out", args.force)
    result = eval_lm(args.run, args.split, args.max_batches, args.out, args.step)
    print(json.dumps(result, indent=2))
    return 0


# ---- compile -----------------------------------------------------------------------------------------------
def cmd_compile(args) -> int:
    cfg = _load(args)
    if args.devices < 0:
        raise UserError(f"--devices: must be >= 1, got {args.devices}")
    if cfg.mesh.data <= 0 and not args.devices:
        raise UserError(f"mesh.data={cfg.mesh.data} (all devices): give the device count with --devices N")
    n = args.devices or cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    jax.config.update("jax_platforms", "cpu")
    import time

    from memlm.sharding import mesh_from_config
    from memlm.train import setup as setup_lib

    mesh = mesh_from_config(cfg.mesh, jax.devices()[:n])
    setup = setup_lib.build_setup(cfg, mesh)
    setup_lib.check_layout(setup)
    spec = setup_lib.batch_spec(cfg)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sh[k]) for k, v in spec.items()}
    step = setup_lib.jit_train_step(setup)
    t0 = time.perf_counter()
    with setup.activate():
        lowered = step.lower(setup.abstract_params, setup.abstract_opt, setup.abstract_carry, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    gib = 1024**3
    info = {
        "config": args.config,
        "model.kind": cfg.model.kind,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
        "devices": n,
        "params": setup_lib.param_count(setup.abstract_params),
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
    }
    if mem is not None:
        args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
        temp_b, alias_b = mem.temp_size_in_bytes, mem.alias_size_in_bytes
        info.update(
            per_device_argument_gib=round(args_b / gib, 3),
            per_device_output_gib=round(out_b / gib, 3),
            per_device_temp_gib=round(temp_b / gib, 3),
            per_device_alias_gib=round(alias_b / gib, 3),
            per_device_total_gib=round((args_b + out_b + temp_b - alias_b) / gib, 3),
        )
    print(f"parameters: {info['params']:,}")
    if mem is not None:
        print(f"per-device memory: {info['per_device_total_gib']} GiB "
              f"(arguments {info['per_device_argument_gib']}, temporaries {info['per_device_temp_gib']})")
    print(json.dumps(info))
    return 0


# ---- parser ------------------------------------------------------------------------------------------------
def _config_keys_epilog() -> str:
    from memlm.config import config_field_help

    rows = [f"  {key} ({typ}, default {default!r})" for key, typ, default in config_field_help()]
    return "config keys (YAML or key.path=value overrides):\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="memlm", description="Long-context memory transformers in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    epilog = _config_keys_epilog()
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train (or resume) a model from a YAML config", epilog=epilog,
                       formatter_class=raw,
                       description="Train a model. Resumes automatically from the latest checkpoint in run.dir.")
    t.add_argument("config", help="YAML config file (may use `base:` inheritance)")
    t.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compile", help="AOT-compile the train step for the configured mesh on fake CPU devices",
                       epilog=epilog, formatter_class=raw,
                       description="Lower and compile the train step without real hardware; print the parameter "
                                   "count and per-device memory from compiled.memory_analysis().")
    c.add_argument("config", help="YAML config file")
    c.add_argument("overrides", nargs="*", default=[], help=OVERRIDES_HELP)
    c.add_argument("--devices", type=int, default=0,
                   help="number of fake devices (default: the mesh size; required when mesh.data=-1)")
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="evaluate a trained run", description="Evaluation commands.")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    lm = esub.add_parser("lm", help="token perplexity on a split of the run's data",
                         description="Token-level perplexity (memory carried across segments).")
    lm.add_argument("--run", required=True, help="run directory")
    lm.add_argument("--split", default="validation", help="data split (default: validation)")
    lm.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    lm.add_argument("--max-batches", type=int, default=None, help="cap on batches (default: the whole split)")
    lm.add_argument("--out", default=None, help="write the result JSON here (a new file)")
    lm.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    lm.set_defaults(func=cmd_eval_lm)
    _add_optional_eval(esub)

    from memlm.data.cli import add_data_commands

    add_data_commands(sub)
    try:
        from memlm.export_cli import add_export_import_commands
    except ModuleNotFoundError as e:  # pragma: no cover  (the export module is optional while it is built)
        if e.name != "memlm.export_cli":
            raise
    else:
        add_export_import_commands(sub)
    return p


def _add_optional_eval(esub) -> None:
    """BABILong / PG-19 evaluation commands (memlm.eval.commands)."""
    from memlm.eval.commands import add_eval_commands

    add_eval_commands(esub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops collecting a positional list at the first option, so `memlm compile CFG --devices 8 a.b=1`
    # would leave `a.b=1` over: overrides after an option still count as overrides (in their order)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = list(args.overrides) + extra
    _quiet()
    errors.AS_COMMAND = argv is None
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if errors.COMMAND_STDERR_FD is not None:  # descriptor 2 was silenced after a failed checkpoint read
            os.write(errors.COMMAND_STDERR_FD, f"memlm: error: {e}\n".encode())
            return 2
        print(f"memlm: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"memlm: diverged: {e}", file=sys.stderr)
        return 1
    except NonFiniteOutput as e:
        print(f"memlm: non-finite: {e}", file=sys.stderr)
        return 1
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError, FileNotFoundError) as e:
        # a path the user gave (or one under it) that cannot be used as asked: not a bug in memlm
        where = f"{e.filename}: " if e.filename else ""
        print(f"memlm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
