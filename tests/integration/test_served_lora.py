"""LoRA adapters through the running service: REST (native and OpenAI), gRPC and A1111 prompt tags, a real worker
process that loads adapters by name from LDM_LORA_DIR into its byte-bounded cache, and batches that mix adapters.

The model is SD v1's structure at toy width (tests/helpers.py `toy_sd_config`, random weights, saved as a single
file with a tokenizer folder beside it); the adapters are random kohya files made for it. Jobs are submitted
before the worker starts, so it claims them together and runs them as one batch (the batch-size histogram says
so); the same jobs alone afterwards must give the same PNG bytes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.checkpoints import save_model
from models.lora import load_lora
from models.tokenizers import CLIPTokenizer
from service.config import Settings
from service.embedded import free_port
from service.queue import JobStatus, SyncJobQueue
from tests.helpers import (
    drop_keys,
    kohya_lora,
    random_model,
    stop_process,
    torch_threads,
    toy_sd_config,
    wait_until,
    write_clip_tokenizer,
)
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
MODEL = "toysd"
ADAPTERS = 20
FAST: dict[str, Any] = {"redis_timeout_s": 2.0, "redis_connect_timeout_s": 0.5, "redis_retries": 2,
                        "redis_backoff_s": 0.05, "heartbeat_interval_s": 0.5, "max_wait_ms": 20, "max_batch": 8}
JOB = {"steps": 2, "width": 64, "height": 64, "sampler": "ddim", "prompt": "a red circle", "seed": 3}


@dataclass
class Stack:
    settings: Settings
    api: Api
    queue: SyncJobQueue
    folder: Path
    adapter_bytes: int
    worker: subprocess.Popen[bytes] | None = None
    metrics_url: str = ""

    def start_worker(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
        env.update({f"LDM_{k.upper()}": str(v) for k, v in FAST.items()})
        env.update(LDM_REDIS_URL=str(self.settings.redis_url), LDM_KEY_PREFIX=self.settings.key_prefix,
                   LDM_WORKER_METRICS_PORT=str(port), LDM_WORKER_TORCH_THREADS="1", OMP_NUM_THREADS="1",
                   LDM_LORA_DIR=str(self.settings.lora_dir), LDM_LORA_CACHE_MB=str(self.settings.lora_cache_mb),
                   LDM_WORKER_TOKENIZER_DIR=str(self.folder / "tokenizer"))
        with (self.folder / "worker.log").open("wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "service.worker", "--model",
                                            str(self.folder / f"{MODEL}.safetensors")], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"

    def ensure_worker(self) -> None:
        if self.worker is None:
            self.start_worker()
        assert self.worker is not None
        worker = self.worker
        wait_until(lambda: bool(self.queue.workers(MODEL)), 120, "the worker to register", every_s=0.05,
                   procs=[worker], log=lambda: (self.folder / "worker.log").read_text(errors="replace"))

    def submit(self, **fields: Any) -> str:
        resp = self.api.client.post("/v1/jobs", json={**JOB, **fields})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def png(self, job_id: str, timeout_s: float = 120) -> bytes:
        deadline = time.monotonic() + timeout_s
        while (job := self.queue.get(job_id)) is None or not job.status.terminal:
            assert time.monotonic() < deadline, f"job {job_id} did not end"
            time.sleep(0.02)
        assert job.status == JobStatus.succeeded, job.error
        png = self.queue.result(job_id, 0)
        assert png is not None
        return png

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:
            text = answer.read().decode()
        found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert found, f"{name} not in the worker's metrics"
        return float(found[1])

    def rss_bytes(self) -> int:
        assert self.worker is not None
        status = Path(f"/proc/{self.worker.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert found
        return int(found[1]) * 1024


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("served-lora")
    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    loras = folder / "loras"
    loras.mkdir()
    with torch_threads(1):
        model = random_model(toy_sd_config(CLIPTokenizer.from_dir(tokenizer).vocab_size, name=MODEL), seed=0)
        save_model(model, folder / f"{MODEL}.safetensors")
        for i in range(ADAPTERS):
            kohya_lora(model, loras / f"l{i}.safetensors", seed=10 + i, text=i % 2 == 0, every=4)
        size = max(load_lora(p, model).nbytes for p in loras.glob("*.safetensors"))
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=MODEL,
                        lora_dir=loras, lora_cache_mb=3.5 * size / 2**20, **FAST)
    queue = SyncJobQueue(settings)
    try:
        with serving(settings) as api:
            s = Stack(settings, api, queue, folder, size)
            yield s
    finally:
        if s.worker is not None:
            stop_process(s.worker)
        queue.close()
        drop_keys(redis_url, settings.key_prefix)


def test_jobs_with_different_adapters_share_a_batch_and_get_their_solo_images(stack: Stack) -> None:
    """Three jobs, queued before the worker starts: LoRA l0 at 0.8, l1 at 1.0 (as an A1111 prompt tag), none.
    They run as one batch of 3, and each PNG equals the one the same job makes alone."""
    jobs = [{"loras": [{"name": "l0", "weight": 0.8}]}, {"prompt": "a red circle <lora:l1:1.0>"}, {}]
    batched = [stack.submit(**job) for job in jobs]
    stack.ensure_worker()
    together = [stack.png(j) for j in batched]
    assert stack.metric("ldm_batch_size_sum") == 3 and stack.metric("ldm_batch_size_count") == 1
    record = stack.queue.get(batched[1])
    assert record is not None and record.request.prompt == "a red circle " and record.request.loras[0].name == "l1"
    alone = [stack.png(stack.submit(**job)) for job in jobs]
    assert together == alone
    assert len(set(together)) == 3  # the adapters change the image
    assert stack.metric("ldm_lora_loads_total") == 2


def test_unknown_or_path_names_are_refused_by_name(stack: Stack) -> None:
    for name, message in (("nope", "unknown LoRA 'nope'"), ("../loras/l0", "String should match pattern"),
                          ("l0..x", "is not a name")):
        resp = stack.api.client.post("/v1/jobs", json={**JOB, "loras": [{"name": name}]})
        assert resp.status_code == 422 and message in resp.text, resp.text
    listed = stack.api.client.get("/sdapi/v1/loras").json()
    assert sorted(item["name"] for item in listed) == sorted(f"l{i}" for i in range(ADAPTERS))
    tag = stack.api.client.post("/v1/jobs", json={**JOB, "prompt": "x <hypernet:foo:1>"})
    assert tag.status_code == 422 and "only <lora:name:weight>" in tag.text


def test_the_worker_cache_stays_bounded_cycling_through_20_adapters(stack: Stack) -> None:
    """80 jobs, each with one of 20 adapters in turn: the cache holds at most 3.5 of the largest adapter's bytes,
    every job reads its file again (evicted since: an LRU cycled through more files than it holds always misses),
    and the worker's RSS does not grow with the requests once warm."""
    stack.ensure_worker()
    bound = stack.settings.lora_cache_mb * 2**20
    rss = []
    for round_ in range(4):
        ids = [stack.submit(loras=[{"name": f"l{i}"}], seed=round_, steps=1) for i in range(ADAPTERS)]
        for job_id in ids:
            stack.png(job_id)
            assert stack.metric("ldm_lora_cache_bytes") <= bound
        assert 1 <= stack.metric("ldm_lora_cache_adapters") < ADAPTERS / 2  # 3.5 of the largest adapter's bytes
        rss.append(stack.rss_bytes())
    assert stack.metric("ldm_lora_loads_total") >= 4 * ADAPTERS  # evicted adapters are read again
    # measured from the second round on: the first two warm the allocator (on a busy machine the jobs batch
    # differently from round to round, and the finisher's and PNG threads' arenas reach their high-water mark then);
    # a leak grows with every round, so 40 requests after warm-up must not add more than allocator noise
    grown = rss[3] - rss[1]
    assert grown < 16 * 2**20, f"worker RSS grew {grown / 2**20:.1f} MiB over 40 requests after warm-up: {rss}"


@pytest.mark.anyio
async def test_every_front_end_takes_loras_and_gives_the_same_image(stack: Stack) -> None:
    """One job (l2 at 0.6) through native REST, OpenAI's images API (extra field) and gRPC: the same PNG; an unknown
    name is INVALID_ARGUMENT over gRPC."""
    import base64

    import grpc

    from tests.integration.test_served_conditionings import grpc_stub, pb

    stack.ensure_worker()
    native = stack.png(stack.submit(loras=[{"name": "l2", "weight": 0.6}], prompt="a blue square"))
    openai = stack.api.client.post("/v1/images/generations", json={
        "prompt": "a blue square", "size": "64x64", "steps": 2, "sampler": "ddim", "seed": 3, "guidance_scale": 7.5,
        "loras": [{"name": "l2", "weight": 0.6}]})
    assert openai.status_code == 200, openai.text
    assert base64.b64decode(openai.json()["data"][0]["b64_json"]) == native
    params = {"prompt": "a blue square", "steps": 2, "sampler": "ddim", "seed": 3, "width": 64, "height": 64}
    async with grpc_stub(stack.settings) as stub:
        answer = await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
            loras=[pb.Lora(name="l2", weight=0.6)], **params)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(
                loras=[pb.Lora(name="ghost")], **params)))
    assert answer.images[0].png == native and [(x.name, x.weight) for x in answer.parameters.loras] == [("l2", 0.6)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown LoRA 'ghost'" in str(err.value.details())
