"""SDXL UNet step against diffusers on the CPU (`python bench/model_bench.py --family sdxl`), with model_bench's
method: one process, both UNets on the same random weights (diffusers' built from ours, sharing their storage),
runs interleaved after a warm-up, medians of the clean runs, FLOPs counted with the math attention backend.

The case is SDXL base's: latent 64x64 (512 px), batch 2 (classifier-free guidance), its 2048-wide context and
2816-wide added vector, 3 levels with 1 / 2 / 10 transformer blocks. At full width (320 channels, 2.57 B
parameters, 10.3 GB in fp32) two copies do not fit beside the other work of a 23 GB, 2-core machine, so the
default is half width (160 channels: 80 / 160 / 320 per level, 32-channel heads, the same block structure and
depths, ~0.65 B parameters); `--full` runs the real size where the memory is.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch

from bench.model_bench import count_gflop, cpu_model, interleaved, matmul_peak_gflops, random_normal
from models.cpu_inference import optimize_for_cpu_inference
from models.diffusers_layout import unet_key_map
from models.unet import UNet, UNetConfig

#: SDXL base's UNet (sgm's config: transformer_depth [0, 2, 10], context 2048, adm 2816, 64-channel heads)
SDXL_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
                       num_heads=-1, num_head_channels=64, level_depths=(1, 2, 10), context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=2816)


def bench_config(full: bool) -> UNetConfig:
    return SDXL_UNET if full else dataclasses.replace(SDXL_UNET, model_channels=160, num_head_channels=32)


def diffusers_twin(ours: UNet) -> Any:
    """diffusers' UNet2DConditionModel of the same config, its parameters our tensors (no copy)."""
    import diffusers

    c = ours.config
    channels = [c.model_channels * m for m in c.channel_mult]
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(
            sample_size=128, in_channels=c.in_channels, out_channels=c.out_channels, layers_per_block=c.num_res_blocks,
            block_out_channels=tuple(channels), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                  "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=tuple(ch // c.num_head_channels for ch in channels),
            transformer_layers_per_block=c.level_depths, cross_attention_dim=c.context_dim,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=c.adm_in_channels)
    state = ours.state_dict()
    names = unet_key_map(list(state), c)
    theirs.load_state_dict({names[k]: v for k, v in state.items()}, strict=True, assign=True)
    return theirs.eval()


def run_sdxl(runs: int, full: bool) -> dict[str, Any]:
    config = bench_config(full)
    with torch.device("meta"):
        eager = random_normal(UNet(config))
    eager.eval().requires_grad_(False)
    theirs = diffusers_twin(eager)
    g = torch.Generator().manual_seed(1)  # the inputs
    x, t = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0])
    ctx, pooled = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 1280, generator=g)
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]] * 2)
    from models.text.sdxl import added_vector

    y = added_vector(pooled, time_ids, 256)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.inference_mode():
        gflop = count_gflop(lambda: eager(x, t, ctx, y))
    # at full width a second 10 GB copy does not fit: ours is optimized in place (diffusers keeps the tensors it
    # was given; the check below proves the two still compute the same function)
    fast = eager if full else copy.deepcopy(eager)
    optimize_for_cpu_inference(fast)
    with torch.inference_mode():
        assert (fast(x, t, ctx, y) - theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
                ).abs().max() < 1e-3  # the same model, or the timing means nothing
        results = {"unet_step": interleaved({
            "ours": lambda: fast(x, t, ctx, y),
            "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample,
        }, runs)}
    params = sum(p.numel() for p in theirs.parameters())
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": __import__("diffusers").__version__,
                    "matmul_peak_gflops": round(matmul_peak_gflops(), 1)},
        "setup": {"family": "sdxl", "latent": 64, "size_px": 512, "unet_batch": 2, "runs": runs, "dtype": "fp32",
                  "weights": "random, SDXL base UNet " + ("shapes" if full else "at half width (160 channels)"),
                  "unet_parameters": params, "model_channels": config.model_channels},
        "flops": {"unet_step_gflop": round(gflop, 1)},
        "results": results,
    }


def report_sdxl(data: dict[str, Any]) -> str:
    r, setup = data["results"]["unet_step"], data["setup"]
    ours, theirs = r["ours"]["median_s"], r["diffusers"]["median_s"]
    gflop, peak = data["flops"]["unet_step_gflop"], data["machine"]["matmul_peak_gflops"]
    width = "full width" if setup["model_channels"] == 320 else f"{setup['model_channels']} channels (half width)"
    return "\n".join([
        "| what | ours (s) | diffusers (s) | ours / diffusers | ours effective GFLOP/s | % of matmul peak |",
        "|---|---|---|---|---|---|",
        f"| SDXL UNet step, 64x64 latent, batch 2 (CFG), {width} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | "
        f"{gflop / ours:.0f} | {100 * gflop / ours / peak:.0f} % |",
        f"\n{setup['unet_parameters'] / 1e6:.1f} M UNet parameters; UNet step {gflop} GFLOP; fp32 matmul peak "
        f"measured here: {peak:.0f} GFLOP/s.",
    ])
