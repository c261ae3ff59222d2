"""bench/fusion_ablation.py: each fused variant computes the same UNet (to float rounding), switching back gives
the default's exact output, and the report has a row per variant."""

from __future__ import annotations

import pytest
import torch

from bench import fusion_ablation as ablation
from models.cpu_inference import optimize_for_cpu_inference
from models.unet import UNet, UNetConfig
from tests.helpers import randomize

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the variants are oneDNN ops")


def test_variants_compute_the_same_unet_and_switch_back() -> None:
    # SD v1 structure at 1/10 width: GEGLU feed-forwards, 1x1 skip convs (320 -> 640 -> 1280 in SD), plain blocks
    unet = optimize_for_cpu_inference(randomize(UNet(UNetConfig(model_channels=32, context_dim=32))))
    switch = ablation.Switch(unet, {})
    assert switch.geglus and switch.skips and switch.plain
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        reference = unet(x, t, ctx)
        for name, parts in ablation.VARIANTS.items():
            switch.apply(parts)
            out = unet(x, t, ctx)
            assert (out - reference).abs().max() <= 1e-4 * reference.abs().max(), name
            if "geglu" in parts:  # a different computation, not the default by mistake
                assert not torch.equal(out, reference), name
        switch.apply(())
        assert torch.equal(unet(x, t, ctx), reference)


def test_report_has_a_row_per_variant() -> None:
    results = {name: {"median_s": 1.0 + i / 10, "runs_s": [1.0] * 3, "clean_runs": 3}
               for i, name in enumerate(ablation.VARIANTS)}
    data = {"results": results, "max_abs_difference": dict.fromkeys(ablation.VARIANTS, 0.0),
            "setup": {"unet_step_gflop": 360.2}, "machine": {"matmul_peak_gflops": 190.0},
            "default_time_shares": {"convolutions": 0.5, "elementwise and other": 0.05}}
    table = ablation.report(data)
    for i, name in enumerate(ablation.VARIANTS):
        assert f"| {name} | {1.0 + i / 10:.3f} | {1.0 + i / 10:.3f} |" in table
    assert "convolutions 50 %, elementwise and other 5 %" in table


def test_time_shares_add_up_and_find_the_products() -> None:
    unet = randomize(UNet(UNetConfig(model_channels=32, context_dim=32)))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        shares = ablation.time_shares(lambda: unet(x, t, ctx), unet)
    assert set(shares) == {"Winograd convolutions", *ablation.OP_KINDS, "elementwise and other"}
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert shares["convolutions"] > 0 and shares["attention (SDPA)"] > 0


def test_the_convolution_variants_swap_winograd_and_direct_and_switch_back() -> None:
    # 256- and 768-channel levels: the first goes by Winograd by default, the second (above 640) stays direct
    config = UNetConfig(model_channels=256, channel_mult=(1, 3), num_res_blocks=1, attention_resolutions=(2,),
                        context_dim=32)
    unet = randomize(UNet(config))
    alternatives = ablation.conv_alternatives(unet)
    assert {part for part, _ in alternatives.values()} == {"direct", "winograd1280"}
    optimize_for_cpu_inference(unet)
    switch = ablation.Switch(unet, alternatives)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        reference = unet(x, t, ctx)
        for name in ("direct", "winograd1280"):
            switch.apply(ablation.VARIANTS[name])
            out = unet(x, t, ctx)
            assert (out - reference).abs().max() <= 1e-4 * reference.abs().max(), name
            assert not torch.equal(out, reference), name  # the other algorithm, not the default by mistake
        switch.apply(())
        assert torch.equal(unet(x, t, ctx), reference)
        shares = ablation.time_shares(lambda: unet(x, t, ctx), unet)
    assert shares["Winograd convolutions"] > 0 and shares["convolutions"] > 0
    assert abs(sum(shares.values()) - 1.0) < 1e-9
