"""The worker's runner step by step (what continuous batching runs), in process on `random:tiny-sd` at 64x64: jobs
started with `Runner.start` and sampled in one `StepBatch`, joining at different steps with different samplers,
step counts, seeds and guidance, give the very PNG bytes `Runner.run` gives each alone; previews are PNGs."""

from __future__ import annotations

import io
from collections.abc import Hashable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from PIL import Image

from models.pipeline import Started
from models.step_batch import StepBatch
from service.schemas import GenerationRequest, Task
from service.worker.runner import JobFailure, Runner, SampleInput
from tests.helpers import torch_threads

MODEL = "random:tiny-sd"


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with torch_threads(1):
        yield Runner.load(MODEL, device="cpu")


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(**{"model": MODEL, "prompt": "a red circle", "width": 64, "height": 64, "steps": 3,
                                "seed": 1, **fields})


def test_started_jobs_in_one_step_batch_give_the_pngs_of_solo_runs(runner: Runner) -> None:
    jobs = {
        "a": request(sampler="dpmpp_2m", steps=4, seed=5, guidance_scale=6.0),
        "b": request(sampler="plms", steps=3, seed=6, prompt="a blue square", n=2),
        "c": request(sampler="euler_a", steps=2, seed=7, guidance_scale=1.0),
    }
    arrivals = {0: ["a"], 1: ["b"], 2: ["c"]}
    batch = StepBatch(runner.pipeline.denoiser, max_items=8)
    started: dict[str, Started] = {}
    inputs: dict[str, list[SampleInput]] = {}
    pngs: dict[tuple[str, int], bytes] = {}
    iteration = 0
    while len(batch) or iteration <= max(arrivals):
        for name in arrivals.get(iteration, []):
            r = jobs[name]
            inputs[name] = [SampleInput(r, seed) for seed in r.seeds()]
            started[name] = runner.start(runner.batch_key(r, None), inputs[name])
            for sample in started[name].samples:
                batch.admit(replace(sample, key=(name, sample.key)))
        for s in batch.step():
            if s.state.done:
                name, index = str(s.key[0]), int(s.key[1])  # type: ignore[index]
                image = started[name].finish(index, s.latent)
                pngs[(name, index)] = runner.png(runner.batch_key(jobs[name], None), inputs[name][index], image)
        iteration += 1
    for name, r in jobs.items():
        alone = runner.run(runner.batch_key(r, None), inputs[name])
        assert [pngs[(name, i)] for i in range(r.n)] == alone, name


def test_start_refuses_what_run_refuses(runner: Runner) -> None:
    r = request(task=Task.upscale, image=b"x")
    with pytest.raises(JobFailure, match="unsupported"):
        runner.start(runner.batch_key(r, Image.new("RGB", (16, 16))), [SampleInput(r, 1, Image.new("RGB", (16, 16)))])


def test_previews_are_pngs_of_the_image_aspect(runner: Runner) -> None:
    r = request(width=128, height=64)
    key = runner.batch_key(r, None)
    sample = runner.start(key, [SampleInput(r, 1)]).samples[0]
    keyed: Hashable = sample.key
    assert keyed == 0
    data = runner.preview(torch.randn(1, 4, 8, 16), key)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (128, 64)
