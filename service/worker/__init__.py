"""The worker: a process per device that loads its model once and runs batches of queued jobs.

- `batcher`: the batching decision, a pure function (`make_batches`); imports neither Redis nor torch;
- `runner`: the only code that touches the device (`Runner`: load, decode inputs, run a batch, encode PNGs);
- `process`: the loop claim -> schedule -> execute -> update, heartbeats, signals (`run_worker`, `ldm worker`).

`python -m service.worker --model SPEC` runs one with settings from the environment (`LDM_*`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_worker"]


def __getattr__(name: str) -> Any:
    """`run_worker` on first use, so that importing the batcher does not import torch."""
    if name == "run_worker":
        from service.worker.process import run_worker

        return run_worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
