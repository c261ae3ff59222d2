"""`python -m tests.reliability.poison_worker --model SPEC --worker-id ID`: the real worker (`service.worker`), with
one fault injected: after the first sampler step of a batch holding a prompt that contains POISON, the process
kills itself with SIGKILL, as the kernel's OOM killer or a GPU driver fault would kill it mid-batch.

A request that crashes its worker every time is the fault a poison-job test needs, and no valid request can cause
one on purpose on this machine, so it is injected here, in the test's own entry point: the shipped worker code
carries no test hook. Everything else (claim, batching, heartbeats, reclaim, dead letters) is the real code.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from service.worker import runner
from service.worker.__main__ import main
from tests.reliability.procs import POISON

_real_call = runner.Runner._call


def _call(self: runner.Runner, task: Any, specs: list[Any], settings: Any, samples: Sequence[Any],
          progress: Any, watch: Any = None) -> Any:
    if not any(POISON in s.prompt for s in specs):
        return _real_call(self, task, specs, settings, samples, progress, watch)

    def crash_after_first_step(step: int, total: int) -> None:
        progress(step, total)  # the step is recorded first: the batch is really under way
        os.kill(os.getpid(), signal.SIGKILL)

    return _real_call(self, task, specs, settings, samples, crash_after_first_step, watch)


runner.Runner._call = _call  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
