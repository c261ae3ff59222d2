"""models/gpu_inference.py: the UNet replayed from CUDA graphs gives the eager step's output bit for bit, one graph
per input bucket, and runs eagerly whatever a graph could not see (a LoRA hook, autograd, CPU tensors).

The CUDA cases need a GPU: they run on the device machine (`python3 -m pytest tests/unit/test_gpu_inference.py
-n 0`), as bench/device/gpu_bench.py does; the rest run everywhere."""

from __future__ import annotations

import pytest
import torch

from models.gpu_inference import CudaGraphForward, graphs_of, optimize_for_gpu_inference
from models.names import GPU_MODES
from models.unet import UNet, UNetConfig
from service.cli import build_parser

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on the device machine")


def toy_unet(device: str = "cpu", dtype: torch.dtype = torch.float32) -> UNet:
    torch.manual_seed(0)
    config = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                        channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2, context_dim=16,
                        use_spatial_transformer=True, norm_groups=8)
    unet = UNet(config).eval().requires_grad_(False)
    for p in unet.parameters():  # every weight drawn: the original init zeroes the output conv (an all-zero output)
        p.normal_(0.0, 0.1)
    return unet.to(device=device, dtype=dtype)


def inputs(batch: int, size: int = 8, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + size)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0).to(device)
    ctx = torch.randn(batch, 5, 16, generator=g).to(device, dtype)
    return x, t, ctx


def test_an_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        optimize_for_gpu_inference(toy_unet(), "fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", GPU_MODES)
def test_a_model_on_the_cpu_is_left_as_it_is(mode: str) -> None:
    unet = toy_unet()
    optimize_for_gpu_inference(unet, mode)  # type: ignore[arg-type]
    assert graphs_of(unet) is None and "forward" not in vars(unet)
    assert unet.input_blocks[0][0].weight.is_contiguous()  # not made channels_last


def test_cpu_inputs_run_eagerly_without_a_capture() -> None:
    unet = toy_unet()
    graphed = CudaGraphForward(unet)
    with torch.inference_mode():
        expected, out = unet(*inputs(2)), graphed(*inputs(2))
    assert torch.equal(out, expected.detach()) and graphed.captures == 0 and graphed.pool is None
    assert expected.abs().max() > 0.1


def test_the_command_line_takes_a_gpu_mode() -> None:
    parser = build_parser()
    assert parser.parse_args(["generate", "a cat", "--gpu-mode", "eager"]).gpu_mode == "eager"
    assert parser.parse_args(["generate", "a cat"]).gpu_mode == "graphs"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "a cat", "--gpu-mode", "fast"])


@CUDA
def test_graphs_replay_the_eager_step_bit_for_bit_per_bucket() -> None:
    unet = toy_unet("cuda", torch.float16)
    unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.inference_mode():
        expected = {(b, s): unet(*inputs(b, s, "cuda", torch.float16)) for b, s in ((2, 8), (4, 8), (2, 16))}
        optimize_for_gpu_inference(unet, "graphs")
        graphed = graphs_of(unet)
        assert graphed is not None
        for _ in range(2):  # the second round replays the graphs the first captured
            for (b, s), want in expected.items():
                assert torch.equal(unet(*inputs(b, s, "cuda", torch.float16)), want)
    assert graphed.captures == 3 and graphed.replays == 6 and not graphed.failed


@CUDA
def test_a_hooked_unet_runs_eagerly() -> None:
    unet = toy_unet("cuda", torch.float16)
    optimize_for_gpu_inference(unet, "graphs")
    graphed = graphs_of(unet)
    assert graphed is not None
    layer = unet.input_blocks[0][0]
    handle = layer.register_forward_hook(lambda module, args, out: out + 1)  # as a LoRA adapter's low-rank term
    try:
        with torch.inference_mode():
            hooked = unet(*inputs(2, device="cuda", dtype=torch.float16))
            eager = graphed.eager(*inputs(2, device="cuda", dtype=torch.float16))
    finally:
        handle.remove()
    assert torch.equal(hooked, eager) and graphed.captures == 0
    with torch.inference_mode():
        plain = unet(*inputs(2, device="cuda", dtype=torch.float16))
    assert graphed.captures == 1 and not torch.equal(plain, hooked)
