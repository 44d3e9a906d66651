"""The training loop: data -> jitted step -> metrics -> checkpoints, resumable and preemption-safe.

Read top to bottom: validate everything (config vs run dir, data, tokenizer) before writing anything; build
the sharded state (fresh or restored from the latest checkpoint in run.dir, with the memory carry and the
data position); loop; save on schedule, on SIGTERM and on exit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np

from memlm import config as config_lib
from memlm import distributed
from memlm.checkpoint import Checkpointer, check_savable
from memlm.data import pipeline
from memlm.errors import TrainingDiverged, UserError
from memlm.metrics import MetricsWriter, metrics_records
from memlm.sharding import mesh_from_config
from memlm.train import setup as setup_lib
from memlm.train.optimizer import lr_schedule

log = logging.getLogger(__name__)

# Keys that may change between runs sharing a run dir (everything else in `model`/`data` must match).
def check_run_dir(cfg) -> None:
    """A run dir holding checkpoints must have been written by a compatible config; one holding a training
    history (metrics, data positions) without a checkpoint to resume it is not started over unless it is the
    same model's run cut before its first checkpoint. Raises UserError before anything is written."""
    run_dir = cfg.run.dir
    saved_path = os.path.join(run_dir, "config.yaml")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"run.dir {run_dir}: is a file, not a directory")
    if os.path.lexists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        raise UserError(f"{ckpt_dir}: is a file, not the run's checkpoint directory")
    if os.path.lexists(saved_path) and not os.path.isfile(saved_path):
        raise UserError(f"{saved_path}: is not a file")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    logged = [rec["step"] for rec, _ in metrics_records(metrics_path)] if os.path.lexists(metrics_path) else []
    has_ckpt = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
    if not has_ckpt:
        ds_dir = os.path.join(run_dir, "data_state")
        saved_steps = sorted(int(n) for n in os.listdir(ds_dir) if n.isdigit()) if os.path.isdir(ds_dir) else []
        # data_state/N is written with every checkpoint: with no trace of any in checkpoints/ (not even the temp dir
        # of a save cut by a kill) the checkpoints were there and are gone
        if saved_steps and not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
            raise UserError(f"{run_dir}: data_state/ holds the data positions of checkpoints {saved_steps} but "
                            "checkpoints/ has none; refusing to start this run over (restore the checkpoints or "
                            "use another run.dir)")
        if max(logged, default=0) > 0:  # a run killed before its first checkpoint may start over, nothing else
            if not os.path.isfile(saved_path):
                raise UserError(f"{run_dir}: metrics.jsonl logs steps up to {max(logged)} but there is no "
                                "config.yaml and no checkpoint; refusing to overwrite it (use another run.dir)")
            _check_same_model(cfg, saved_path, "its metrics.jsonl was logged")
        return
    if not os.path.isfile(saved_path):
        raise UserError(f"{run_dir}: has checkpoints but no config.yaml; refusing to guess whether they match")
    saved = _check_same_model(cfg, saved_path, "checkpoint was written")
    for key in ("batch_size",):
        if getattr(saved.train, key) != getattr(cfg.train, key):
            raise UserError(f"{run_dir}: checkpoint was written with train.{key}={getattr(saved.train, key)}"
                            f" but the config says {getattr(cfg.train, key)} (the memory carry has one row per"
                            " batch slot)")


def _check_same_model(cfg, saved_path: str, what: str):
    """The run dir's config.yaml (returned) must describe cfg's model. Raises UserError naming the first key."""
    saved = config_lib.load_config(saved_path)
    diffs = config_lib.config_differences(saved.model.model_dump(mode="json"), cfg.model.model_dump(mode="json"),
                                          "model")
    if diffs:
        key, was, now = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise UserError(f"{cfg.run.dir}: {what} with {key}={was!r} but the config says {now!r}{more} "
                        "(use another run.dir)")
    return saved


def _data_state_path(run_dir: str, step: int, process: int) -> str:
    return os.path.join(run_dir, "data_state", str(step), f"process_{process}.json")


def _save_data_state(run_dir: str, step: int, state: dict) -> None:
    path = _data_state_path(run_dir, step, jax.process_index())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _load_data_state(run_dir: str, step: int, fallback: dict) -> dict:
    """Merge the per-process slot cursors saved at `step` (works when the process count changed)."""
    d = os.path.dirname(_data_state_path(run_dir, step, 0))
    merged = dict(fallback)
    merged["slots"] = dict(fallback.get("slots", {}))
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if name.endswith(".json"):
                path = os.path.join(d, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        part = json.load(f)
                except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    raise UserError(f"{path}: not a readable data position ({type(e).__name__})") from None
                if not isinstance(part, dict) or not isinstance(part.get("slots"), dict):
                    raise UserError(f"{path}: not a data position (a JSON object with a \"slots\" mapping)")
                merged.update({k: v for k, v in part.items() if k != "slots"})
                merged["slots"].update(part["slots"])
    return merged


def _prune_data_states(run_dir: str, keep_steps: list[int]) -> None:
    base = os.path.join(run_dir, "data_state")
    if not os.path.isdir(base) or jax.process_index() != 0:
        return
    for name in os.listdir(base):
        if name.isdigit() and int(name) not in keep_steps:
            for f in os.listdir(os.path.join(base, name)):
                os.remove(os.path.join(base, name, f))
            os.rmdir(os.path.join(base, name))


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def n_segments_for_step(cfg, step: int) -> int:
    """Segments in this step's batch: fixed, or U{1..n_segments} from (seed, step) (RMT's vary_n_segments).
    Each distinct count compiles the step once."""
    if not cfg.data.vary_n_segments:
        return cfg.data.n_segments
    return int(np.random.default_rng([cfg.run.seed, 7919, step]).integers(1, cfg.data.n_segments + 1))


def warm_start(setup, source_dir: str):
    """Params from the latest checkpoint of another run (a curriculum's previous stage)."""
    src_ckpt = os.path.join(source_dir, "checkpoints")
    ckpt = Checkpointer(src_ckpt, async_save=False, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"train.init_from: {source_dir} has no checkpoint")
        try:
            params = ckpt.restore_params(step, setup.abstract_params)
        except UserError as e:
            raise UserError(f"train.init_from: {e}") from None
    finally:
        ckpt.close()
    log.info("warm start from %s step %d", source_dir, step)
    return params


def evaluate_loss(setup, eval_step, params, batches, slots) -> float:
    """Token-mean eval loss over fixed batches, memory carried across them from a fresh state."""
    carry = setup_lib.init_carry(setup, params)
    total, count = 0.0, 0.0
    with setup.activate():
        for b in batches:
            local = {k: v[slots] for k, v in b.items()}
            loss_sum, n, carry = eval_step(params, carry, distributed.to_global(local, setup.batch_sh))
            total += float(loss_sum)
            count += float(n)
    return total / max(count, 1.0)


def train(cfg) -> dict:
    """Train (or resume) the run described by `cfg`. Returns the last logged metrics."""
    distributed.initialize(cfg.distributed)
    run_dir = cfg.run.dir
    check_run_dir(cfg)

    # Data and tokenizer are validated before anything is written to the run dir.
    tokenizer = pipeline.get_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ({tokenizer.name})")
    corpus = pipeline.get_corpus(cfg, "train", tokenizer)
    slots = distributed.host_slots(cfg.train.batch_size)
    batcher = pipeline.train_batcher(cfg, corpus, slots)
    eval_batches = []
    if cfg.train.eval_every:
        eval_corpus = pipeline.get_corpus(cfg, cfg.data.eval_split, tokenizer)
        eval_batches = pipeline.eval_batches(cfg, eval_corpus, cfg.train.eval_batches)

    mesh = mesh_from_config(cfg.mesh)
    setup = setup_lib.build_setup(cfg, mesh)
    setup_lib.check_layout(setup)
    check_savable(setup.abstract_params, "parameter")
    check_savable(setup.abstract_carry, "memory carry")
    is_main = jax.process_index() == 0
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    warm = None  # read before the run dir is created, so a source that does not fit leaves nothing behind
    if cfg.train.init_from and not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
        warm = warm_start(setup, cfg.train.init_from)
    # not created here: a run refused while its step traces (below) leaves no checkpoints/ behind
    ckpt = Checkpointer(ckpt_dir, cfg.train.max_checkpoints, cfg.train.async_checkpoint, create=False)
    start = ckpt.latest_step()
    if start is not None:
        params, opt_state, carry, data = ckpt.restore(start, setup.abstract_params, setup.abstract_opt,
                                                      setup.abstract_carry)
        position = _load_data_state(run_dir, start, data.get("data_position", {}))
        try:
            if not position.get("fresh"):  # `memlm import` writes a fresh position: start the data anew
                batcher.restore(position)
        except ValueError as e:
            raise UserError(f"{run_dir}: checkpoint {start} data position does not fit this data ({e})") from None
        except KeyError as e:
            raise UserError(f"{run_dir}: checkpoint {start} data position does not fit this data (it has no field "
                            f"{e}: written for another data.source?)") from None
        log.info("resumed from step %d", start)
    else:
        start = 0
        if warm is None and cfg.train.init_from:  # a checkpoints dir without a finished step
            warm = warm_start(setup, cfg.train.init_from)
        params = setup_lib.init_params(setup, cfg.run.seed) if warm is None else warm
        opt_state = setup_lib.init_opt_state(setup, params)
        carry = setup_lib.init_carry(setup, params)

    # Trace the step before anything is written: the models check what only their shapes reveal (a segment
    # longer than an attention span, more sensory tokens than a segment, a kernel the backend lacks) while tracing.
    step_fn = setup_lib.jit_train_step(setup)
    spec = setup_lib.batch_spec(cfg)
    with setup.activate():
        step_fn.trace(params, opt_state, carry,
                      {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sh[k]) for k, v in spec.items()})
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)  # the manager was opened without creating it (above)
        config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    writer = MetricsWriter(run_dir, enabled=is_main)
    writer.truncate_after(start)
    eval_step = setup_lib.jit_eval_step(setup) if eval_batches else None
    schedule = lr_schedule(cfg.train)
    tokens_per_step = cfg.train.batch_size * cfg.data.n_segments * cfg.data.segment_len

    def save(step: int, force: bool = False) -> None:
        position = batcher.state()
        _save_data_state(run_dir, step, position)
        ckpt.save(step, params, opt_state, carry, position, force=force)
        _prune_data_states(run_dir, ckpt.all_steps() + [step])

    bar = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    last: dict = {}
    step = start
    diverged = False
    t_last, steps_since = time.perf_counter(), 0
    with _Preemption() as preempt, setup.activate():
        try:
            while step < cfg.train.steps:
                local = batcher.next(n_segments_for_step(cfg, step))
                batch = distributed.to_global(local, setup.batch_sh)
                params, opt_state, carry, metrics = step_fn(params, opt_state, carry, batch)
                step += 1
                steps_since += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    m = jax.device_get(metrics)
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since
                    t_last, steps_since = now, 0
                    last = {k: float(np.asarray(v)) for k, v in m.items()}
                    last.update(lr=float(schedule(step - 1)), step_time=dt, tokens_per_sec=tokens_per_step / dt)
                    if eval_step is not None and step % cfg.train.eval_every == 0:
                        last["eval_loss"] = evaluate_loss(setup, eval_step, params, eval_batches, slots)
                    writer.write(step, last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}")
                    if not np.isfinite(last["loss"]):  # keep the last good checkpoint; never save NaN weights
                        diverged = True
                        good = [s for s in ckpt.all_steps() if s < step]
                        raise TrainingDiverged(
                            f"loss is {last['loss']} at step {step} (metrics in {run_dir}/metrics.jsonl); "
                            f"latest checkpoint kept: {max(good) if good else 'none'}. Lower train.lr or the "
                            "memory's inner step size (e.g. model.titans.max_lr), or bound Titans' inner "
                            "gradients (model.titans.inner_grad_clip=1.0)")
                if bar is not None:
                    bar.update(1)
                if step % cfg.train.checkpoint_every == 0 or preempt.requested:
                    save(step)
                if preempt.requested:
                    log.warning("SIGTERM: checkpoint saved at step %d, exiting", step)
                    break
        except KeyboardInterrupt:
            log.warning("interrupted: saving a checkpoint at step %d", step)
            if step > start:
                save(step, force=True)
            raise
        finally:
            if step > start and step not in ckpt.all_steps() and not preempt.requested and not diverged:
                save(step, force=True)
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
    return {"step": step, **last}
