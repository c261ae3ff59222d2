"""bench/winograd_bench.py: a measured row holds both timings, an error at float rounding, and its table line."""

from __future__ import annotations

import pytest
import torch

from bench import winograd_bench

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="both kernels are oneDNN's")


def test_a_row_times_both_kernels_and_reports_the_error() -> None:
    row = winograd_bench.measure(16, 8, 6, runs=3)
    assert row["times"]["direct"]["median_s"] > 0 and row["times"]["winograd"]["median_s"] > 0
    assert row["ratio"] == row["times"]["winograd"]["median_s"] / row["times"]["direct"]["median_s"]
    assert 0 < row["max_rel_error"] < 1e-5
    table = winograd_bench.report({"rows": [row]})
    assert "| 16 -> 8 | 6x6, 2 | kept | " in table and f"**{row['ratio']:.2f}**" in table


def test_an_autoencoder_row_transforms_its_filters_per_call_at_no_extra_memory() -> None:
    row = winograd_bench.measure(8, 8, 9, runs=3, batch=1, per_call=True)
    assert row["batch"] == 1 and row["per_call"] and row["extra_filter_mb"] == 0.0
    assert 0 < row["max_rel_error"] < 1e-5
    assert "| 8 -> 8 | 9x9, 1 | per call | " in winograd_bench.report({"rows": [row]})


def test_the_report_has_a_row_per_policy_of_the_image_differences() -> None:
    data = {"rows": [], "image_differences": {"balanced": {"mean_abs_255": 0.0012, "max_abs_255": 1},
                                              "all": {"mean_abs_255": 0.0031, "max_abs_255": 2}}}
    table = winograd_bench.report(data)
    assert "| balanced | 0.0012 | 1 |" in table and "| all | 0.0031 | 2 |" in table
