"""Metrics writers: `<run.dir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from memlm.errors import UserError, not_utf8


class MetricsWriter:
    """Append-only JSONL + TensorBoard. Only process 0 writes."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run re-does those steps and logs them again), and a last line cut
        by a kill mid-write. Any other malformed line is refused (metrics_records), not dropped."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [line + "\n" for rec, line in metrics_records(self.path) if rec.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v) if not isinstance(v, str) else v
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        for k, v in rec.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def metrics_records(path: str) -> list[tuple[dict, str]]:
    """(record, line without its newline) for every line of a metrics.jsonl; a last line that does not parse (cut
    by a kill mid-write) is skipped. UserError, naming the file and line, for anything else that is not a JSON
    object with an integer "step" (a metrics file memlm did not write, or one edited by hand)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not the run's metrics file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise UserError(f"{path}: line {i + 1} is not JSON (only a last line cut by a kill is skipped)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise UserError(f"{path}: line {i + 1} is not a metrics record (a JSON object with an integer step)")
        out.append((rec, line))
    return out


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [rec for rec, _ in metrics_records(path)]
