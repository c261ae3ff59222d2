"""bench/model_bench.py's matmul peak: measured through both GEMM libraries, the best rate of any measurement, and
the report says how it was measured (older result files hold torch.mm's alone)."""

from __future__ import annotations

from bench import model_bench


def test_both_libraries_are_measured() -> None:
    rates = model_bench.matmul_peaks(n=128, runs=1)
    assert set(rates) == {"torch_mm", "onednn"}
    assert all(rate > 0 for rate in rates.values())


def test_the_peak_is_the_best_rate_of_any_measurement() -> None:
    before, after = {"torch_mm": 131.3, "onednn": 119.8}, {"torch_mm": 104.8, "onednn": 191.2}
    assert model_bench.matmul_peak_gflops(before, after) == 191.2
    assert model_bench.matmul_peak_gflops(before) == 131.3


def _data(machine: dict[str, object]) -> dict[str, object]:
    unet = {"ours": {"median_s": 2.0}, "diffusers": {"median_s": 3.0}}
    return {"results": {"unet_step": unet}, "flops": {"unet_step_gflop": 360.0, "vae_decode_gflop": 622.0},
            "setup": {"size_px": 256, "steps": 20}, "machine": machine, "peak_rss_gib": {}}


def test_report_names_the_peak_and_its_share() -> None:
    measured = [{"torch_mm": 160.0, "onednn": 180.0}, {"torch_mm": 150.0, "onednn": 200.0}]
    table = model_bench.report(_data({"matmul_peak_gflops": 200.0, "matmul_gflops_measured": measured}))
    assert "| 0.67 | 180 | 90 % |" in table  # 360 GFLOP in 2 s against 200 GFLOP/s
    assert "torch.mm 160, onednn 200" in table  # each library's best
    old = model_bench.report(_data({"matmul_peak_gflops": 180.0}))
    assert "(torch.mm 4096^2)" in old and "| 100 % |" in old
