"""Does fusing the UNet's elementwise work into oneDNN's products pay on this CPU? Measured, not assumed.

Issue 19 proposed fusions for the CPU path (oneDNN post-ops). The default path (models/cpu_inference.py: prepacked
3x3 convolutions, channels_last, folded oneDNN token linears, fused SDPA) leaves little elementwise work: on the
SD-1.5 UNet at 256 px the GEMMs, convolutions and attention take ~95 % of a step. This bench applies each candidate
to the same prepared SD-1.5 UNet (random weights, fp32, latent 32x32, batch 2), times the step interleaved with the
default (medians over the clean runs, as bench/model_bench.py does), and reports each one's time relative to the
default and its largest difference from the default's output, and where the default step's time goes (shares of
torch.profiler's self CPU time by kind of op):

- `geglu`: the feed-forward's GEGLU as two oneDNN products with post-ops (the gate's GELU (erf) in the first, the
  multiply by the gate in the second) instead of one product, a chunk, GELU and a multiply.
- `pack1x1`: the ResBlocks' 1x1 skip convolutions prepacked like the 3x3 ones.
- `resadd`: with `pack1x1`, the ResBlock's residual sum as a binary-add post-op of its last convolution (where
  that convolution is direct: in the 1280-channel blocks unless `direct` is on too).
- `skiplinear`: the 1x1 skip convolutions as token linears (the channels_last map viewed as [N, HW, C] through
  models/layers.py's folded oneDNN product, as SpatialTransformer's proj_in does).
- `geglu+skiplinear`: the two that do not lose.
- `direct`: the 320- and 640-channel 3x3 convolutions, which the default computes by Winograd's F(2x2, 3x3)
  (models/winograd.py), by oneDNN's direct kernel, prepacked (the default before Winograd).
- `winograd1280`: the 1280-channel 3x3 convolutions by Winograd too (their filters take 16/9 the memory: about
  +1 GB at SD-1.5's size, which is why the default leaves them direct).

GroupNorm + SiLU has no eager oneDNN op; the compiled opt-in mode (inductor) fuses it with the rest, and is
measured in `python bench/model_bench.py --opt-ins`. A candidate is worth adopting only if it wins beyond the
run-to-run noise (about 10 % on the shared 2-core machine, ../shared/reference/cpu-baseline.md).

    python bench/fusion_ablation.py [--runs 15] [--out bench/results/fusion_ablation.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_bench import build_ours, count_gflop, cpu_model, interleaved, matmul_peak_gflops  # noqa: E402
from bench.results_io import publish  # noqa: E402
from models.attention import GEGLU  # noqa: E402
from models.cpu_inference import PackedConv2d, optimize_for_cpu_inference, winograd_wins  # noqa: E402
from models.layers import batch_invariant_linear  # noqa: E402
from models.unet import ResBlock  # noqa: E402
from models.winograd import WinogradConv2d  # noqa: E402
from tests.helpers import write_clip_tokenizer  # noqa: E402

VARIANTS = {"default": (), "geglu": ("geglu",), "pack1x1": ("pack1x1",), "resadd": ("pack1x1", "resadd"),
            "skiplinear": ("skiplinear",), "geglu+skiplinear": ("geglu", "skiplinear"), "direct": ("direct",),
            "winograd1280": ("winograd1280",)}


def fused_geglu(self: GEGLU, x: Tensor) -> Tensor:
    weight, bias = self.proj.weight, self.proj.bias
    half = weight.shape[0] // 2
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[half:], bias[half:], "gelu", [], "none")
    out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight[:half], bias[:half], "mul")
    return out


def residual_in_conv(self: ResBlock, x: Tensor, emb: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
    """ResBlock.forward for the plain case (no resampling, no scale-shift): the last conv adds the skip itself."""
    h = self.in_layers(x)
    emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
    h = self.out_layers[2](self.out_layers[1](self.out_layers[0](h + emb_out)))
    conv = self.out_layers[3]
    out: Tensor = torch.ops.mkldnn._convolution_pointwise.binary(
        h, self.skip_connection(x), conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
        "add", None, None, [], None)
    return out


class SkipAsLinear(nn.Module):
    """A 1x1 convolution applied to channels_last activations as one token linear; output channels_last too."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight.flatten(1), conv.bias

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        out = batch_invariant_linear(x.permute(0, 2, 3, 1).reshape(n, h * w, c), self.weight, self.bias)
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def conv_alternatives(unet: nn.Module) -> dict[tuple[nn.Module, str], tuple[str, nn.Module]]:
    """Before the UNet is prepared: for each convolution the `all` policy computes by Winograd, the variant that
    changes how it is computed and its module for that variant (direct for the default's Winograd ones, Winograd for
    the others)."""
    return {(parent, name): ("direct", PackedConv2d(conv)) if winograd_wins(conv)
            else ("winograd1280", WinogradConv2d(conv))
            for parent in unet.modules() for name, conv in parent.named_children()
            if isinstance(conv, nn.Conv2d) and winograd_wins(conv, "all")}


class Switch:
    """Applies a variant to one prepared UNet by swapping instance attributes (nothing is rebuilt per run)."""

    def __init__(self, unet: nn.Module, alternatives: dict[tuple[nn.Module, str], tuple[str, nn.Module]]) -> None:
        self.convs = {(parent, name): (getattr(parent, name), part, module)
                      for (parent, name), (part, module) in alternatives.items()}
        self.geglus = [m for m in unet.modules() if isinstance(m, GEGLU)]
        self.blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
        self.plain = [b for b in self.blocks if b.resample is None and not b.use_scale_shift_norm]
        self.skips = {b: (b.skip_connection, PackedConv2d(b.skip_connection), SkipAsLinear(b.skip_connection))
                      for b in self.blocks if isinstance(b.skip_connection, nn.Conv2d)}

    def apply(self, parts: Sequence[str]) -> None:
        for (parent, name), (default, part, module) in self.convs.items():
            setattr(parent, name, module if part in parts else default)
        for m in self.geglus:
            vars(m).pop("forward", None)
            if "geglu" in parts:
                m.forward = types.MethodType(fused_geglu, m)  # type: ignore[method-assign]
        for block, (conv, packed, linear) in self.skips.items():
            block.skip_connection = packed if "pack1x1" in parts else linear if "skiplinear" in parts else conv
        for block in self.plain:
            vars(block).pop("forward", None)
            if "resadd" in parts and isinstance(block.out_layers[3], PackedConv2d):
                block.forward = types.MethodType(residual_in_conv, block)  # type: ignore[method-assign]


#: torch.profiler op names by kind, for the default step's time shares (the rest counts as elementwise and other)
OP_KINDS = {"convolutions": ("mkldnn::_convolution_pointwise", "aten::mkldnn_convolution"),
            "token linears": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm"),
            "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",)}


WINOGRAD_RANGE = "winograd convolution"


def time_shares(fn: Callable[[], Any], unet: nn.Module) -> dict[str, float]:
    """Each kind of op's share of one call's self CPU time (torch.profiler, which inflates the small ops); the
    Winograd convolutions (their products are oneDNN linears too) count as one kind, everything under them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    winograds = [m for m in unet.modules() if isinstance(m, WinogradConv2d)]
    for m in winograds:
        def traced(x: Tensor, m: WinogradConv2d = m) -> Tensor:
            with record_function(WINOGRAD_RANGE):
                return WinogradConv2d.forward(m, x)
        m.forward = traced  # type: ignore[method-assign]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for m in winograds:
            vars(m).pop("forward", None)
    times = dict.fromkeys(["Winograd convolutions", *OP_KINDS, "elementwise and other"], 0.0)
    for event in prof.events():
        parent, kind = event, None
        while parent is not None and kind is None:
            kind = "Winograd convolutions" if parent.name == WINOGRAD_RANGE else None
            parent = parent.cpu_parent
        kind = kind or next((k for k, ops in OP_KINDS.items() if event.name in ops), "elementwise and other")
        times[kind] += event.self_cpu_time_total
    total = sum(times.values())
    return {kind: t / total for kind, t in times.items()}


def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_ours(write_clip_tokenizer(Path(tmp) / "tokenizer"))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.inference_mode():
        gflop = count_gflop(lambda: model.unet(x, t, ctx))  # before packing: FlopCounterMode misses packed convs
    alternatives = conv_alternatives(model.unet)
    optimize_for_cpu_inference(model)  # in place
    unet = model.unet
    switch = Switch(unet, alternatives)

    def step(parts: Sequence[str]) -> Callable[[], Tensor]:
        def call() -> Tensor:
            switch.apply(parts)
            out: Tensor = unet(x, t, ctx)
            return out
        return call

    with torch.inference_mode():
        reference = step(())()
        differences = {name: float((step(parts)() - reference).abs().max()) for name, parts in VARIANTS.items()}
        shares = time_shares(step(()), unet)
        results = interleaved({name: step(parts) for name, parts in VARIANTS.items()}, runs)
    return {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "matmul_peak_gflops": round(matmul_peak_gflops(), 1)},
        "setup": {"model": "SD-1.5 UNet, random weights", "latent": 32, "unet_batch": 2, "dtype": "fp32",
                  "runs": runs, "unet_step_gflop": round(gflop, 1)},
        "max_abs_difference": differences,
        "default_time_shares": {kind: round(share, 3) for kind, share in shares.items()},
        "results": results,
    }


def report(data: dict[str, Any]) -> str:
    res = data["results"]
    base = res["default"]["median_s"]
    lines = ["| variant | UNet step (s) | vs default | clean runs | max difference from default |",
             "|---|---|---|---|---|"]
    for name in VARIANTS:
        r = res[name]
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['median_s'] / base:.3f} | {r['clean_runs']}/"
                     f"{len(r['runs_s'])} | {data['max_abs_difference'][name]:.1e} |")
    lines.append(f"\nSD-1.5 UNet step, latent 32x32, batch 2, fp32, {data['setup']['unet_step_gflop']} GFLOP; "
                 f"fp32 matmul peak {data['machine']['matmul_peak_gflops']:.0f} GFLOP/s.")
    lines.append("Default step's time (torch.profiler, self CPU time): " + ", ".join(
        f"{kind} {100 * share:.0f} %" for kind, share in data["default_time_shares"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per variant after the warm-up (default 15)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion_ablation.json")
    args = parser.parse_args()
    data = run(args.runs)
    publish(data, report(data), args.out)


if __name__ == "__main__":
    main()
