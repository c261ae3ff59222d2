"""models/winograd.py: F(2x2, 3x3) convolutions equal the direct convolution to float rounding, round an item the
same alone or in any batch, and replace exactly the UNet convolutions `optimize_for_cpu_inference` says they do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.cpu_inference import WINOGRAD_MAX_CHANNELS, WINOGRAD_MIN_CHANNELS, PackedConv2d, prepack_convolutions
from models.names import WINOGRAD_POLICIES, WinogradPolicy
from models.unet import UNet, UNetConfig
from models.winograd import WinogradConv2d, transform_filter, winograd_applies, winograd_conv3x3

# (in, out, height, width): SD's level widths at small latents, odd and tiny sizes (a 1x1 map is one tile per item)
SHAPES = [(320, 320, 16, 16), (640, 320, 8, 8), (256, 640, 4, 4), (7, 5, 9, 7), (16, 8, 1, 1), (4, 6, 2, 3)]


def conv(c_in: int, c_out: int, seed: int) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, 3, padding=1).eval().requires_grad_(False)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_the_direct_convolution_to_rounding(shape: tuple[int, int, int, int]) -> None:
    c_in, c_out, h, w = shape
    layer = conv(c_in, c_out, sum(shape))
    x = torch.randn(3, c_in, h, w).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
        ours, direct = WinogradConv2d(layer)(x), layer(x)
    scale = float(expected.abs().max())
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    # as close to the exact result as oneDNN's direct kernel is, within a small factor
    assert float((ours.double() - expected).abs().max()) <= max(4 * float((direct.double() - expected).abs().max()),
                                                                1e-7 * scale)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_an_item_rounds_the_same_in_any_batch(shape: tuple[int, int, int, int], threads: int) -> None:
    c_in, c_out, h, w = shape
    layer = WinogradConv2d(conv(c_in, c_out, 1))
    x = torch.randn(5, c_in, h, w).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            batches = [layer(x[:n].contiguous(memory_format=torch.channels_last)) for n in (1, 2, 5)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(b[0], batches[0][0]) for b in batches)
    assert torch.equal(batches[1][1], batches[2][1])


@pytest.mark.parametrize("shape", [(32, 24, 17, 9), (16, 16, 8, 8), (8, 8, 1, 5)], ids=lambda s: "x".join(map(str, s)))
def test_bands_give_the_result_of_the_whole_map(shape: tuple[int, int, int, int]) -> None:
    """Large maps go in bands of tile rows (BAND_BYTES); every band size, down to one tile row, gives the same bits
    as the whole map in one band (odd heights included: the last band is short)."""
    c_in, c_out, h, w = shape
    layer = conv(c_in, c_out, 2)
    x = torch.randn(2, c_in, h, w).contiguous(memory_format=torch.channels_last)
    filters, bias = transform_filter(layer.weight), layer.bias
    row = 16 * ((w + 1) // 2) * max(c_in, c_out) * 4  # bytes of tiles in one tile row of one item
    with torch.inference_mode():
        whole = winograd_conv3x3(x, filters, bias, band_bytes=1 << 40)
        for rows in (1, 2, 3):
            assert torch.equal(winograd_conv3x3(x, filters, bias, band_bytes=rows * row), whole), rows
        assert torch.equal(winograd_conv3x3(x, filters, bias, band_bytes=1), whole)  # below one row: one row


def test_refuses_a_convolution_it_does_not_compute() -> None:
    for odd in (nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 3, padding=0), nn.Conv2d(8, 8, 1),
                nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)):
        assert not winograd_applies(odd)
        with pytest.raises(ValueError, match="not a 3x3, stride 1"):
            WinogradConv2d(odd)


@pytest.mark.parametrize("policy", WINOGRAD_POLICIES)
def test_optimizing_takes_winograd_for_the_unet_convolutions_its_policy_names(policy: WinogradPolicy) -> None:
    config = UNetConfig(in_channels=4, out_channels=4, model_channels=WINOGRAD_MIN_CHANNELS // 2,
                        channel_mult=(1, 2, 4, 6), num_res_blocks=1, attention_resolutions=(), context_dim=None)
    torch.manual_seed(0)
    model = nn.ModuleDict({"unet": UNet(config).eval().requires_grad_(False),
                           "other": nn.Conv2d(256, 256, 3, padding=1)})  # not in a UNet: stays direct
    before = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0])
    with torch.inference_mode():
        reference = model["unet"](x, t)
        prepack_convolutions(model, policy)
        optimized = model["unet"](x.contiguous(memory_format=torch.channels_last), t)
    after = dict(model.named_modules())
    kinds = set()
    for name, old in before.items():
        low, high = sorted((old.in_channels, old.out_channels))
        wins = (name.startswith("unet.") and winograd_applies(old) and policy != "off"
                and low >= WINOGRAD_MIN_CHANNELS and (policy == "all" or high <= WINOGRAD_MAX_CHANNELS))
        assert isinstance(after[name], WinogradConv2d if wins else PackedConv2d | nn.Conv2d), name
        kinds.add((wins, high > WINOGRAD_MAX_CHANNELS))
    # balanced: mid-width ones by Winograd, wide ones direct; all: the wide ones by Winograd; off: none
    expected = {"balanced": (True, False), "all": (True, True), "off": (False, False)}[policy]
    assert expected in kinds
    assert torch.allclose(optimized, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    if policy == "off":  # oneDNN's direct kernel throughout, as PyTorch's eager convolution: bit-identical
        assert torch.equal(optimized, reference)


@pytest.mark.parametrize("policy", WINOGRAD_POLICIES)
def test_an_autoencoders_wide_convolutions_take_winograd_with_filters_made_per_call(policy: WinogradPolicy) -> None:
    """Encoder and decoder convolutions of at least WINOGRAD_MIN_CHANNELS go by Winograd under every policy but `off`,
    keeping the weight alone (no memory beyond it); the narrower ones stay direct; the images match to rounding."""
    config = AutoencoderConfig(ch=WINOGRAD_MIN_CHANNELS // 2, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    torch.manual_seed(0)
    model = Autoencoder(config).eval().requires_grad_(False)
    before = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model.decode(model.encode(x).mode())
        prepack_convolutions(model, policy)
        optimized = model.decode(model.encode(x).mode())
    after = dict(model.named_modules())
    wide = [name for name, old in before.items()
            if winograd_applies(old) and min(old.in_channels, old.out_channels) >= WINOGRAD_MIN_CHANNELS]
    assert any(n.startswith("encoder.") for n in wide) and any(n.startswith("decoder.") for n in wide)
    for name, old in before.items():
        if name in wide and policy != "off":
            layer = after[name]
            assert isinstance(layer, WinogradConv2d) and layer.per_call and layer.filters is None, name
            assert layer.taps is not None and torch.equal(layer.taps, old.weight.flatten(1).reshape(-1, 9))
        else:  # direct: prepacked, or the 1x1 ones as they are
            assert isinstance(after[name], PackedConv2d if old.kernel_size == (3, 3) else nn.Conv2d), name
    scale = float(reference.abs().max())
    assert torch.allclose(optimized, reference, rtol=0, atol=1e-5 * scale)
    if policy == "off":
        assert torch.equal(optimized, reference)


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        prepack_convolutions(nn.ModuleDict({"unet": UNet(UNetConfig(model_channels=32, context_dim=None))}),
                             "fast")  # type: ignore[arg-type]


def test_ldm_generate_takes_a_policy_and_refuses_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "x"]).winograd == "balanced"
    assert parser.parse_args(["generate", "x", "--winograd", "all"]).winograd == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "x", "--winograd", "fast"])
    assert "'fast'" in capsys.readouterr().err
