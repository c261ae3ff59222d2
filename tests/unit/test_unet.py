"""UNet and attention blocks: shapes, conditioning modes, the attention math, the original block
numbering and key shapes of SD v1 (ldm-facts §3.3), and parameter counts of the released configs."""

import math
from typing import Any

import pytest
import torch

from models.attention import AttentionBlock, CrossAttention, SpatialTransformer, qkv_attention_legacy
from models.unet import UNet, UNetConfig, timestep_embedding
from tests.helpers import randomize as _randomize

TOY = UNetConfig(model_channels=32, context_dim=32)  # SD v1 structure, 8 heads of 4/8/16 channels


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, 320)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(160) / 160)
    assert emb.shape == (4, 320)
    assert torch.allclose(emb[:, :160], torch.cos(t[:, None] * freqs), atol=1e-5)
    assert torch.allclose(emb[:, 160:], torch.sin(t[:, None] * freqs), atol=1e-5)
    assert torch.equal(emb[0], torch.cat([torch.ones(160), torch.zeros(160)]))
    assert timestep_embedding(t.float(), 7).shape == (4, 7)


def test_toy_forward_shape_and_context_use() -> None:
    model = _randomize(UNet(TOY))
    x, t = _randn(2, 4, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = model(x, t, _randn(2, 7, 32, seed=1))
        other = model(x, t, _randn(2, 7, 32, seed=2))
        scalar_t = model(x, torch.tensor(10.0), _randn(2, 7, 32, seed=1))
    assert out.shape == (2, 4, 32, 32) and out.dtype == torch.float32
    assert not torch.allclose(out, other)  # the context reaches the output
    assert torch.allclose(scalar_t[0], out[0], atol=1e-5)  # a 0-d timestep is broadcast


def test_batch_items_are_independent() -> None:
    model = _randomize(UNet(TOY))
    x, t, ctx = _randn(3, 4, 16, 16), torch.tensor([1.0, 400.0, 999.0]), _randn(3, 5, 32, seed=1)
    with torch.no_grad():
        batched = model(x, t, ctx)
        single = model(x[1:2], t[1:2], ctx[1:2])
    assert torch.allclose(batched[1:2], single, atol=1e-5)


def test_unconditional_has_self_attention_attn2() -> None:
    model = _randomize(UNet(UNetConfig(model_channels=32, context_dim=None)))
    assert model.state_dict()["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)
    with torch.no_grad():
        out = model(_randn(2, 4, 16, 16), torch.tensor([5, 50]))
        ignored = model(_randn(2, 4, 16, 16), torch.tensor([5, 50]), context=_randn(2, 3, 32))
    assert out.shape == (2, 4, 16, 16) and torch.equal(out, ignored)


def test_class_conditional() -> None:
    model = _randomize(UNet(UNetConfig(model_channels=32, context_dim=None, num_classes=10)))
    assert model.state_dict()["label_emb.weight"].shape == (10, 128)
    x, t = _randn(2, 4, 16, 16), torch.tensor([5, 50])
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([0, 1])), model(x, t, y=torch.tensor([3, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)
    with pytest.raises(ValueError, match="class labels"):
        UNet(TOY)(x, t, _randn(2, 3, 32), y=torch.tensor([0, 1]))


def test_nine_channel_input() -> None:
    model = _randomize(UNet(UNetConfig(in_channels=9, model_channels=32, context_dim=32)))
    assert model.state_dict()["input_blocks.0.0.weight"].shape == (32, 9, 3, 3)
    with torch.no_grad():
        assert model(_randn(1, 9, 32, 32), torch.tensor([3]), _randn(1, 4, 32)).shape == (1, 4, 32, 32)


def test_legacy_attention_block_model() -> None:
    config = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                        attention_resolutions=(2,), num_heads=-1, num_head_channels=16,
                        use_spatial_transformer=False, context_dim=None, legacy=True)
    model = _randomize(UNet(config))
    block = model.get_submodule("input_blocks.4.1")
    assert isinstance(block, AttentionBlock) and block.heads == 4
    assert model.state_dict()["input_blocks.4.1.qkv.weight"].shape == (192, 64, 1)
    assert model.state_dict()["middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    with torch.no_grad():
        assert model(_randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3, 16, 16)


def test_scale_shift_and_resblock_updown() -> None:
    config = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=8,
                        use_spatial_transformer=False, context_dim=None, use_scale_shift_norm=True,
                        resblock_updown=True, legacy=True)
    model = _randomize(UNet(config))
    keys = model.state_dict()
    assert keys["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # 2 * out for scale and shift
    assert "input_blocks.3.0.in_layers.2.weight" in keys and not any(".op." in k for k in keys)
    assert "output_blocks.2.2.in_layers.0.weight" in keys  # the up-ResBlock after the attention
    with torch.no_grad():
        assert model(_randn(2, 4, 16, 16), torch.tensor([1, 2])).shape == (2, 4, 16, 16)


def test_linear_projection_transformer() -> None:
    model = UNet(UNetConfig(model_channels=32, num_heads=-1, num_head_channels=8, context_dim=16,
                            use_linear_in_transformer=True))
    assert model.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (32, 32)
    model = _randomize(model)
    with torch.no_grad():
        assert model(_randn(1, 4, 16, 16), torch.tensor([7]), _randn(1, 3, 16)).shape == (1, 4, 16, 16)


def test_cross_attention_math() -> None:
    attn = _randomize(CrossAttention(16, context_dim=8, heads=2, dim_head=4))
    x, ctx = _randn(2, 5, 16), _randn(2, 3, 8, seed=1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, -1, 2, 4).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(ctx)), heads(attn.to_v(ctx))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # d_head ** -0.5 = 1/2
    reference = attn.to_out(((weights @ v).transpose(1, 2)).reshape(2, 5, 8))
    with torch.no_grad():
        assert torch.allclose(attn(x, ctx), reference, atol=1e-6)


def test_legacy_qkv_attention_matches_original_einsum() -> None:
    qkv, heads = _randn(2, 3 * 2 * 8, 10), 2
    # guided-diffusion QKVAttentionLegacy, verbatim math
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    reference = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    assert torch.allclose(qkv_attention_legacy(qkv, heads), reference, atol=1e-6)


def test_spatial_transformer_is_identity_at_init() -> None:
    block = SpatialTransformer(32, heads=4, dim_head=8, context_dim=16)  # zero-init proj_out
    x = _randn(1, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(block(x, _randn(1, 2, 16)), x)


def test_bfloat16_forward_keeps_dtype() -> None:
    model = _randomize(UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                                       context_dim=32))).to(torch.bfloat16)
    with torch.no_grad():
        out = model(_randn(1, 4, 8, 8).bfloat16(), torch.tensor([3]), _randn(1, 2, 32).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_heads_rule() -> None:
    sd = UNetConfig()
    assert [sd.heads(c) for c in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
    assert UNetConfig(num_heads=-1, num_head_channels=64).heads(320) == (5, 64)
    assert UNetConfig(num_heads=1).heads(960) == (1, 960)
    with pytest.raises(ValueError):
        UNetConfig(num_heads=-1)
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        UNetConfig(use_spatial_transformer=False)


class _Shapes(dict[str, tuple[int, ...]]):
    """Key -> shape of the SD v1 UNet (emb 1280, context 768), in original-layout terms."""

    def param(self, name: str, *shape: int, bias: bool = True) -> None:
        self[f"{name}.weight"] = shape
        if bias:
            self[f"{name}.bias"] = (shape[0],)

    def res(self, name: str, cin: int, cout: int) -> None:
        self.param(f"{name}.in_layers.0", cin)
        self.param(f"{name}.in_layers.2", cout, cin, 3, 3)
        self.param(f"{name}.emb_layers.1", cout, 1280)
        self.param(f"{name}.out_layers.0", cout)
        self.param(f"{name}.out_layers.3", cout, cout, 3, 3)
        if cin != cout:
            self.param(f"{name}.skip_connection", cout, cin, 1, 1)

    def st(self, name: str, c: int) -> None:
        block = f"{name}.transformer_blocks.0"
        self.param(f"{name}.norm", c)
        self.param(f"{name}.proj_in", c, c, 1, 1)
        for attn, ctx in (("attn1", c), ("attn2", 768)):
            self.param(f"{block}.{attn}.to_q", c, c, bias=False)
            self.param(f"{block}.{attn}.to_k", c, ctx, bias=False)
            self.param(f"{block}.{attn}.to_v", c, ctx, bias=False)
            self.param(f"{block}.{attn}.to_out.0", c, c)
        self.param(f"{block}.ff.net.0.proj", 8 * c, c)
        self.param(f"{block}.ff.net.2", c, 4 * c)
        for n in (1, 2, 3):
            self.param(f"{block}.norm{n}", c)
        self.param(f"{name}.proj_out", c, c, 1, 1)


_SD_INPUT_RES = [(1, 320, 320, True), (2, 320, 320, True), (4, 320, 640, True), (5, 640, 640, True),
                 (7, 640, 1280, True), (8, 1280, 1280, True), (10, 1280, 1280, False),
                 (11, 1280, 1280, False)]
_SD_OUTPUT_RES = [(0, 2560, 1280), (1, 2560, 1280), (2, 2560, 1280), (3, 2560, 1280), (4, 2560, 1280),
                  (5, 1920, 1280), (6, 1920, 640), (7, 1280, 640), (8, 960, 640), (9, 960, 320),
                  (10, 640, 320), (11, 640, 320)]


def _expected_sd_v1_shapes(in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """SD v1 UNet keys and shapes, written out from the block table of ldm-facts §3.3."""
    shapes = _Shapes()
    shapes.param("time_embed.0", 1280, 320)
    shapes.param("time_embed.2", 1280, 1280)
    shapes.param("input_blocks.0.0", 320, in_channels, 3, 3)
    for i, cin, cout, attn in _SD_INPUT_RES:
        shapes.res(f"input_blocks.{i}.0", cin, cout)
        if attn:
            shapes.st(f"input_blocks.{i}.1", cout)
    for i, c in [(3, 320), (6, 640), (9, 1280)]:
        shapes.param(f"input_blocks.{i}.0.op", c, c, 3, 3)
    shapes.res("middle_block.0", 1280, 1280)
    shapes.st("middle_block.1", 1280)
    shapes.res("middle_block.2", 1280, 1280)
    for i, cin, cout in _SD_OUTPUT_RES:
        shapes.res(f"output_blocks.{i}.0", cin, cout)
        if i >= 3:
            shapes.st(f"output_blocks.{i}.1", cout)
    for name, c in [("output_blocks.2.1.conv", 1280), ("output_blocks.5.2.conv", 1280),
                    ("output_blocks.8.2.conv", 640)]:
        shapes.param(name, c, c, 3, 3)
    shapes.param("out.0", 320)
    shapes.param("out.2", 4, 320, 3, 3)
    return dict(shapes)


@pytest.mark.parametrize(("in_channels", "count"), [(4, 859_520_964), (9, 859_535_364)])
def test_sd_v1_keys_shapes_and_count(in_channels: int, count: int) -> None:
    with torch.device("meta"):
        model = UNet(UNetConfig(in_channels=in_channels))
    assert sum(p.numel() for p in model.parameters()) == count
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == _expected_sd_v1_shapes(in_channels)
    assert actual["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert actual["output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)


_LEGACY: dict[str, Any] = dict(
    num_heads=-1, num_head_channels=32, use_spatial_transformer=False, context_dim=None, legacy=True
)


@pytest.mark.parametrize(
    ("config", "millions"),
    [  # ldm-facts §3.2: UNets of the released models
        (UNetConfig(context_dim=1280), 872.30),  # LDM-KL-8-G txt2img
        (UNetConfig(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                    attention_resolutions=(16, 8), **_LEGACY), 113.62),  # LDM-SR
        (UNetConfig(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                    attention_resolutions=(8, 4, 2), num_heads=1, context_dim=512), 400.92),  # cin256-v2
        (UNetConfig(model_channels=256, channel_mult=(1, 2, 4), num_heads=-1, num_head_channels=32,
                    context_dim=512), 394.98),  # cin256
        (UNetConfig(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                    attention_resolutions=(8, 4, 2), **_LEGACY), 274.06),  # CelebA
        (UNetConfig(model_channels=192, channel_mult=(1, 2, 2, 4, 4), attention_resolutions=(1, 2, 4, 8),
                    use_spatial_transformer=False, context_dim=None, use_scale_shift_norm=True,
                    resblock_updown=True, legacy=True), 294.97),  # LSUN-Churches
        (UNetConfig(in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                    attention_resolutions=(8, 4, 2), use_spatial_transformer=False, context_dim=None,
                    resblock_updown=True, legacy=True), 387.25),  # inpainting_big
        (UNetConfig(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                    attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32, transformer_depth=3,
                    context_dim=512), 246.28),  # layout2img
    ],
)
def test_released_unet_parameter_counts(config: UNetConfig, millions: float) -> None:
    with torch.device("meta"):
        model = UNet(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
