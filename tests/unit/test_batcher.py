"""The batching decision (service/worker/batcher.py), one property a test, in the manner of TGI's queue tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from service.queue import Claim, Job, JobStatus
from service.schemas import BatchKey, GenerationRequest, Task
from service.worker.batcher import Batch, make_batches


def claim(name: str, **fields: Any) -> Claim:
    """A claimed job with an admitted request (model and seed resolved); `name` doubles as the job id."""
    request = GenerationRequest(**{"model": "tiny", "prompt": name, "seed": 100, "width": 64, "height": 64,
                                   "steps": 4, **fields})
    job = Job(id=name, model="tiny", status=JobStatus.queued, request=request,
              created_at=datetime.now(tz=UTC), attempts=1)
    return Claim(job, entry_id=f"0-{name}", consumer="w1")


def layout(batches: list[Batch[Claim]]) -> list[list[tuple[str, int]]]:
    """Each batch as [(job id, sample index), ...]."""
    return [[(s.job.job.id, s.index) for s in b.samples] for b in batches]


def test_empty_input_gives_no_batches() -> None:
    assert make_batches([], max_batch=4) == []


def test_single_job_is_one_batch_of_one() -> None:
    a = claim("a")
    batches = make_batches([a], max_batch=4)
    assert layout(batches) == [[("a", 0)]]
    assert batches[0].key == a.job.request.batch_key() and batches[0].jobs == [a]


def test_compatible_jobs_share_one_batch_in_arrival_order() -> None:
    jobs = [claim("a", guidance_scale=3.0), claim("b", seed=7, negative_prompt="x"), claim("c", guidance_scale=9.0)]
    assert layout(make_batches(jobs, max_batch=8)) == [[("a", 0), ("b", 0), ("c", 0)]]


@pytest.mark.parametrize("difference", [
    {"task": Task.img2img, "image": b"png"}, {"width": 128}, {"height": 32}, {"sampler": "ddim"}, {"steps": 5},
    {"karras": True}, {"sampler": "ddim", "eta": 0.5}, {"model": "other"},
])
def test_incompatible_jobs_run_in_separate_batches(difference: dict[str, Any]) -> None:
    fields = {"sampler": "ddim"} if "eta" in difference else {}
    a, b = claim("a", **fields), claim("b", **difference)
    batches = make_batches([a, b], max_batch=8)
    assert layout(batches) == [[("a", 0)], [("b", 0)]]
    assert batches[0].key != batches[1].key


def test_strength_separates_img2img_jobs_and_defaults_compare_equal() -> None:
    image = {"task": Task.img2img, "image": b"png"}
    jobs = [claim("a", **image), claim("b", **image, strength=0.75), claim("c", **image, strength=0.5)]
    assert layout(make_batches(jobs, max_batch=8)) == [[("a", 0), ("b", 0)], [("c", 0)]]


def test_conditions_vary_per_sample_and_tasks_keep_apart() -> None:
    box = {"label": "red circle", "box": [0.1, 0.1, 0.5, 0.5]}
    conditioned = [("a", {"task": Task.class_, "class_label": "red circle"}),
                   ("b", {"task": Task.layout, "layout": [box]}),
                   ("c", {"task": Task.class_, "class_label": 7, "guidance_scale": 5.0, "seed": 3}),
                   ("d", {"task": Task.layout, "layout": [box, {"label": 2, "box": [0.5, 0.5, 1, 1]}]}),
                   ("e", {"task": Task.unconditional}),
                   ("f", {"task": Task.semantic, "label_map": b"png"}),
                   ("g", {"task": Task.semantic, "label_map": b"other png"}),
                   ("h", {"task": Task.semantic, "label_map": b"png", "width": 32})]
    jobs = [claim(name, **{"prompt": "", **fields}) for name, fields in conditioned]
    assert layout(make_batches(jobs, max_batch=8)) == [
        [("a", 0), ("c", 0)], [("b", 0), ("d", 0)], [("e", 0)], [("f", 0), ("g", 0)], [("h", 0)]]


def test_n_expands_to_n_samples_with_consecutive_seeds() -> None:
    batches = make_batches([claim("a", n=3, seed=40), claim("b", seed=5)], max_batch=8)
    assert layout(batches) == [[("a", 0), ("a", 1), ("a", 2), ("b", 0)]]
    assert [s.seed for s in batches[0].samples] == [40, 41, 42, 5]
    assert len(batches[0]) == 4 and [j.job.id for j in batches[0].jobs] == ["a", "b"]


def test_big_group_is_split_at_max_batch_keeping_fifo_order() -> None:
    jobs = [claim(name) for name in "abcde"]
    assert layout(make_batches(jobs, max_batch=2)) == [[("a", 0), ("b", 0)], [("c", 0), ("d", 0)], [("e", 0)]]


def test_a_job_bigger_than_max_batch_spans_batches() -> None:
    batches = make_batches([claim("a", n=5, seed=10), claim("b")], max_batch=2)
    assert layout(batches) == [[("a", 0), ("a", 1)], [("a", 2), ("a", 3)], [("a", 4), ("b", 0)]]
    assert [s.seed for b in batches for s in b.samples] == [10, 11, 12, 13, 14, 100]


def test_batches_come_in_order_of_their_first_job() -> None:
    jobs = [claim("a", n=3), claim("b", steps=9), claim("c"), claim("d", steps=9)]
    # the 4-sample group of steps 4 is cut after 2; the steps-9 group starts with b, the second job
    assert layout(make_batches(jobs, max_batch=2)) == [
        [("a", 0), ("a", 1)], [("a", 2), ("c", 0)], [("b", 0), ("d", 0)],
    ]


def test_max_batch_one_runs_every_sample_alone() -> None:
    batches = make_batches([claim("a", n=2), claim("b")], max_batch=1)
    assert layout(batches) == [[("a", 0)], [("a", 1)], [("b", 0)]]


def test_every_sample_appears_exactly_once() -> None:
    jobs = [claim(f"j{i}", n=1 + i % 3, steps=4 + i % 2, seed=i * 10) for i in range(11)]
    batches = make_batches(jobs, max_batch=3)
    seen = [(s.job.job.id, s.index) for b in batches for s in b.samples]
    assert sorted(seen) == sorted((c.job.id, i) for c in jobs for i in range(c.job.request.n))
    assert all(1 <= len(b) <= 3 for b in batches)
    assert all(len({s.job.job.request.batch_key() for s in b.samples}) == 1 for b in batches)


def test_bad_max_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        make_batches([claim("a")], max_batch=0)


def test_unresolved_request_is_refused() -> None:
    with pytest.raises(ValueError, match="admit"):
        make_batches([claim("a", seed=None)], max_batch=2)


@dataclass(frozen=True)
class Prepared:
    """Not a Claim: the worker batches its own records, with the input image's size in the key."""

    name: str
    request: GenerationRequest
    size: tuple[int, int]


def test_custom_accessors_let_the_worker_key_by_input_size() -> None:
    r = GenerationRequest(model="tiny", task=Task.img2img, image=b"png", seed=1)  # size left to the image

    def key(p: Prepared) -> BatchKey:
        return p.request.batch_key()._replace(width=p.size[0], height=p.size[1])

    jobs = [Prepared("a", r, (64, 64)), Prepared("b", r, (32, 64)), Prepared("c", r, (64, 64))]
    batches = make_batches(jobs, max_batch=4, request=lambda p: p.request, key=key)
    assert [[s.job.name for s in b.samples] for b in batches] == [["a", "c"], ["b"]]
    assert (batches[0].key.width, batches[1].key.width) == (64, 32)
