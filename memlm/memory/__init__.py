"""Memory mechanisms, one file each; importing this package registers their `model.kind`s."""

from memlm.memory import rmt  # noqa: F401
