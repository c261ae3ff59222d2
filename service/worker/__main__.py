"""`python -m service.worker --model SPEC [--worker-id ID] [--device DEV]`: one worker, settings from `LDM_*`.

The `ldm worker` command is the documented entry; this one needs no console script (tests, supervisors).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.config import load_settings
from service.worker.process import run_worker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.worker", description=__doc__)
    parser.add_argument("--model", required=True, help="shipped model name, checkpoint, diffusers folder or "
                        "random:<config>")
    parser.add_argument("--model-name", default=None, help="queue (model name) to serve; default: from --model")
    parser.add_argument("--worker-id", default=None, help="default: host-pid-random")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N; default: LDM_WORKER_DEVICE or auto")
    args = parser.parse_args(argv)
    return run_worker(load_settings(), args.model, worker_id=args.worker_id, device=args.device,
                      model_name=args.model_name)


if __name__ == "__main__":
    raise SystemExit(main())
