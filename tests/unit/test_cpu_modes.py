"""The CPU compiled opt-in (models/cpu_inference.compile_unet_for_cpu): torch.compile with freezing gives the
eager fp32 UNet's output to float rounding. Slow: inductor compiles C++ kernels (minutes on 2 busy cores)."""

import pytest
import torch

from models.cpu_inference import compile_unet_for_cpu
from models.unet import UNet, UNetConfig
from tests.helpers import randomize


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold inductor cache compiles for minutes on 2 busy cores
def test_compiled_unet_matches_eager() -> None:
    eager = randomize(UNet(UNetConfig(model_channels=32, context_dim=32)), 0).eval().requires_grad_(False)
    compiled = randomize(UNet(UNetConfig(model_channels=32, context_dim=32)), 0).eval().requires_grad_(False)
    compile_unet_for_cpu(compiled)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([981.0, 1.0]), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        expected, got = eager(x, t, ctx), compiled(x, t, ctx)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
