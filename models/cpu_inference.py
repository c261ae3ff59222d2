"""Inference on the CPU: convolutions with weights prepacked once for oneDNN, channels_last activations.

PyTorch's eager `mkldnn_convolution` reorders the weight into oneDNN's blocked layout on every call:
for the 1280-channel 3x3 convs of the SD UNet that is a 59 MB copy per call, ~40 % of the conv's time.
`prepack_convolutions` does the reorder once (the weight is then held only in the blocked layout, so
memory does not grow) and calls the same oneDNN kernel, so outputs are bit-identical. The UNet's 3x3 convolutions
of 256 to 640 channels go by Winograd's F(2x2, 3x3) instead (models/winograd.py): 2.25x fewer multiplications, the
same result to float rounding (~2e-6 relative), still batch-invariant, for filters 16/9 the size (the `winograd`
policy: `all` takes the 1280-channel ones too, `off` none, for bit-identity with the eager convolution), and so do the
autoencoder's of at least 256 channels, with their filters made on each call (no memory beyond the weights). A packed
model is for inference only: it cannot be trained or saved (save before packing).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from models.autoencoder import Decoder, Encoder
from models.names import WINOGRAD_POLICIES, WinogradPolicy
from models.unet import UNet
from models.winograd import WinogradConv2d, winograd_applies


class PackedConv2d(nn.Module):
    """An `nn.Conv2d` (zeros padding) whose weight lives in oneDNN's blocked layout."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not isinstance(conv.padding, tuple):
            raise ValueError(f"cannot prepack a conv with padding {conv.padding!r}")
        self.padding = list(conv.padding)
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        example = [2, conv.in_channels, 16, 16]  # the blocked layout does not depend on the input size
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), self.padding, self.stride, self.dilation, self.groups, example
        )
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )
        return out


def _packable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size != (1, 1)  # 1x1 convs are applied as matmuls (SpatialTransformer) or are tiny
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
        and module.weight.device.type == "cpu"
        and module.weight.dtype in (torch.float32, torch.bfloat16)
    )


#: the UNet convolutions computed by Winograd's F(2x2, 3x3) (models/winograd.py): 3x3, stride 1, fp32, with at least
#: this many input and output channels (below, its transforms cost more than the products save) ...
WINOGRAD_MIN_CHANNELS = 256
#: ... and, by the `balanced` policy, at most this many (SD's 320- and 640-channel levels; the 1280-channel filters,
#: two thirds of the UNet's weights, would take 16/9 the memory, +1.4 GB for SD-1.5, for a step 7 % faster at 256 px:
#: at 4x4 Winograd loses, at 8x8 it gains little; the `all` policy takes them too)
WINOGRAD_MAX_CHANNELS = 640


def winograd_wins(conv: nn.Conv2d, policy: WinogradPolicy = "balanced") -> bool:
    """Whether a UNet convolution goes by Winograd under `policy` (WINOGRAD_POLICIES; bench/fusion_ablation.py
    measures each)."""
    low, high = sorted((conv.in_channels, conv.out_channels))
    return (policy != "off" and winograd_applies(conv) and low >= WINOGRAD_MIN_CHANNELS
            and (policy == "all" or high <= WINOGRAD_MAX_CHANNELS))


def autoencoder_winograd_wins(conv: nn.Conv2d, policy: WinogradPolicy = "balanced") -> bool:
    """Whether an autoencoder's convolution goes by Winograd under `policy` (with its filters transformed on each
    call, so at no memory cost): every policy but `off` takes those of at least WINOGRAD_MIN_CHANNELS in and out
    (the SD VAE's 256- and 512-channel ones: 0.6-0.8x the direct kernel's time from 32x32 to 256x256 maps, in
    bands; models/winograd.py)."""
    return (policy != "off" and winograd_applies(conv)
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS)


def prepack_convolutions(model: nn.Module, winograd: WinogradPolicy = "balanced") -> int:
    """Replace every packable Conv2d in `model` by a PackedConv2d, in place, or, where the policy `winograd` says, by
    a WinogradConv2d: within a UNet with its filters kept (`winograd_wins`), within an autoencoder's encoder or
    decoder with its filters made on each call (`autoencoder_winograd_wins`); returns how many."""
    if winograd not in WINOGRAD_POLICIES:
        raise ValueError(f"winograd policy must be one of {WINOGRAD_POLICIES}, got {winograd!r}")
    if not torch.backends.mkldnn.is_available():
        return 0
    in_unets = {id(m) for unet in model.modules() if isinstance(unet, UNet) for m in unet.modules()}
    in_coders = {id(m) for coder in model.modules() if isinstance(coder, Encoder | Decoder) for m in coder.modules()}
    # (parent, name) pairs only: holding the old conv modules would keep every unpacked weight alive until
    # the end, doubling the conv weights' memory at the peak; this way each is freed as it is replaced
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if _packable(child)]
    trim = _heap_trimmer()
    for parent, name in targets:
        conv = getattr(parent, name)
        if id(conv) in in_unets and winograd_wins(conv, winograd):
            packed: nn.Module = WinogradConv2d(conv)
        elif id(conv) in in_coders and autoencoder_winograd_wins(conv, winograd):
            packed = WinogradConv2d(conv, per_call=True)
        else:
            packed = PackedConv2d(conv)
        setattr(parent, name, packed)
        trim()
    return len(targets)


def _heap_trimmer() -> Callable[[], object]:
    """glibc's `malloc_trim(0)`, or a no-op elsewhere. Loaded weights are separate memory maps, freed at
    once; their packed copies come from the heap, and the holes packing leaves there stay resident until
    trimmed: without it, packing SD's UNet leaves a few hundred MB more resident (and at the peak)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return (lambda: trim(0)) if trim is not None else (lambda: None)


def optimize_for_cpu_inference(model: nn.Module, winograd: WinogradPolicy = "balanced") -> nn.Module:
    """channels_last activations and prepacked conv weights, in place (see the module docstring); `winograd`: which
    UNet and autoencoder convolutions go by Winograd instead (WINOGRAD_POLICIES).

    Packing comes first: the blocked layout is the same whatever the source layout, so packing from the
    loaded weight skips a channels_last copy of every packed conv (one weight's worth of transient memory
    each, which the allocator does not always give back); then the rest (1x1 convs) go channels_last."""
    prepack_convolutions(model, winograd)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512, AMX) and Arm's /proc/cpuinfo names


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU computes in bf16 natively (any of BF16_CPU_FLAGS among the flags of `cpuinfo`); None when
    it cannot be told (no such file). Without them oneDNN emulates bf16, which is slower than fp32; with them bf16
    measured 1.7x (AVX512-BF16) to 2.3x (AMX) the fp32 UNet step (docs/benchmarks.md)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return None
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def cpu_dtype_warning(device: torch.device, dtype: torch.dtype,
                      cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """What to tell someone whose dtype choice makes a CPU run slower than fp32 (None when nothing is wrong): fp16,
    which the CPU path leaves unoptimised (no prepacked convolutions or oneDNN linears), and bf16 on a CPU that
    would only emulate it."""
    if device.type != "cpu":
        return None
    if dtype == torch.float16:
        return ("fp16 asked for on the CPU: it runs without the CPU optimisations (prepacked convolutions, oneDNN "
                "linears) and is slower than fp32; choose fp32, or bf16 where the CPU has bf16 instructions")
    if dtype == torch.bfloat16 and cpu_has_bf16(cpuinfo) is False:
        return (f"bf16 asked for on a CPU without bf16 instructions ({cpuinfo} lists none of "
                f"{', '.join(BF16_CPU_FLAGS)}): oneDNN emulates it, which is slower than fp32; choose fp32 here")
    return None


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedConv2d | WinogradConv2d) for m in model.modules())


def compile_unet_for_cpu(model: nn.Module) -> nn.Module:
    """Opt-in compiled mode: `model.unet` (a LatentDiffusion's, or `model` itself when it has none) runs through
    `torch.compile` (inductor) with freezing, which folds the weights into the graph as constants, prepacks
    them for oneDNN/MKL itself and fuses the elementwise work (GroupNorm + SiLU, bias, residual adds) into
    generated C++ loops. Call it on a model *not* optimized by `optimize_for_cpu_inference`: freezing packs
    the plain weights; the eager weights stay alive beside the packed constants, which is the mode's memory
    cost (docs/benchmarks.md). Each new input shape (batch, latent size) compiles again (a minute or more
    on 2 cores); results are fp32 but not bit-identical to the eager model, nor across batch sizes.
    Needs `torch.inference_mode()` or `no_grad` when run (freezing applies to inference only)."""
    unet = getattr(model, "unet", model)
    unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    unet.compile(options={"freezing": True}, dynamic=False)  # in place: `unet(...)` calls the compiled module
    return model
