"""Run the memlm CLI in a subprocess (fresh jax per run, like a user)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def memlm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "memlm.cli", *args]


def run_memlm(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(memlm_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)


def snapshot(path: str) -> dict[str, tuple[int, float]]:
    """{relative file: (size, mtime)} for every file under path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime)
    return out
