"""First-stage autoencoder: shapes, the KL posterior, VQ straight-through, original key names and
parameter counts of the released configs (ldm-facts §2.1, §2.3, §4.1)."""


import pytest
import torch

from models.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput, DiagonalGaussian
from models.noise import generators_from_seeds
from tests.helpers import randomize as _randomize

TOY_KL = AutoencoderConfig(ch=32, ch_mult=(1, 2), resolution=32)
TOY_VQ = AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 2), resolution=32, n_embed=16, embed_dim=4)


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_checks() -> None:
    assert AutoencoderConfig().downsample_factor == 8
    assert AutoencoderConfig(ch_mult=(1, 2, 4)).downsample_factor == 4
    with pytest.raises(ValueError, match="n_embed"):
        AutoencoderConfig(kind="vq")
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoencoderConfig(ch=48)
    with pytest.raises(ValueError, match="kind"):
        AutoencoderConfig(kind="ae")  # type: ignore[arg-type]


def test_kl_shapes() -> None:
    model = _randomize(Autoencoder(TOY_KL))
    x = _images()
    with torch.no_grad():
        posterior = model.encode(x)
        assert isinstance(posterior, DiagonalGaussian)
        assert posterior.mean.shape == posterior.std.shape == (2, 4, 16, 16)
        assert model.decode(posterior.mode()).shape == (2, 3, 32, 32)
        out = model(x, generators=generators_from_seeds([1, 2]))
    assert isinstance(out, AutoencoderOutput) and out.recon.shape == (2, 3, 32, 32)
    assert out.posterior is not None and out.vq_loss is None


def test_diagonal_gaussian_mode_clamp_and_kl() -> None:
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 8, 4, 4, generator=g)
    params[0, 4:, 0, 0] = 50.0  # logvar beyond the clamp
    params[1, 4:, 0, 0] = -50.0
    dist = DiagonalGaussian(params)
    assert torch.equal(dist.mode(), params[:, :4])
    assert dist.logvar.max() <= 20.0 and dist.logvar.min() >= -30.0
    assert torch.allclose(dist.std, torch.exp(0.5 * dist.logvar))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(dist.mean, dist.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=[1, 2, 3])
    assert torch.allclose(dist.kl(), reference, rtol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(3, 8, 2, 2)).kl(), torch.zeros(3))


def test_posterior_sample_is_per_item() -> None:
    dist = DiagonalGaussian(torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0)))
    both = dist.sample(generators_from_seeds([7, 8]))
    second = DiagonalGaussian(torch.cat([dist.mean[1:], dist.logvar[1:]], dim=1))
    alone = second.sample(generators_from_seeds([8]))
    assert torch.allclose(both[1:], alone)
    eps = (both - dist.mean) / dist.std
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1.0) < 0.1
    with pytest.raises(ValueError, match="one generator per batch item"):
        dist.sample(generators_from_seeds([1]))


def test_vq_encode_is_prequant_and_decode_quantises() -> None:
    model = _randomize(Autoencoder(TOY_VQ))
    with torch.no_grad():
        h = model.encode(_images())
        assert isinstance(h, torch.Tensor) and h.shape == (2, 4, 16, 16)
        z_q, loss, indices = model.quantize_latents(h)
        codebook = model.quantize.embedding.weight  # type: ignore[union-attr]
        assert indices.shape == (2, 16, 16) and indices.dtype == torch.long
        assert torch.allclose(z_q, codebook[indices].permute(0, 3, 1, 2), atol=1e-6)
        assert not torch.allclose(h, z_q)
        # legacy taming loss: both terms have the value mse(z, z_q); beta weighs the second
        assert torch.allclose(loss, 1.25 * torch.mean((h - z_q) ** 2))
        assert torch.allclose(model.decode(h), model.decode(z_q), atol=1e-5)  # z + (z_q - z) rounding


def test_vq_straight_through_gradients() -> None:
    model = _randomize(Autoencoder(TOY_VQ)).train()
    out = model(_images())
    assert out.vq_loss is not None and out.vq_loss.item() > 0 and out.indices is not None
    out.recon.square().mean().backward()  # the reconstruction alone must reach the encoder
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()
    model(_images()).vq_loss.backward()  # type: ignore[union-attr]
    codebook_grad = model.quantize.embedding.weight.grad  # type: ignore[union-attr]
    assert codebook_grad is not None and codebook_grad.abs().sum() > 0


def test_quantize_latents_rejects_kl() -> None:
    with pytest.raises(ValueError, match="VQ"):
        Autoencoder(TOY_KL).quantize_latents(torch.zeros(1, 4, 2, 2))


def test_attention_placement() -> None:
    config = AutoencoderConfig(ch=32, ch_mult=(1, 2), resolution=32, attn_resolutions=(16,))
    keys = Autoencoder(config).state_dict()
    assert "encoder.down.1.attn.1.q.weight" in keys and "decoder.up.1.attn.2.proj_out.weight" in keys
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in keys)
    no_attn = Autoencoder(AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 2), n_embed=8, mid_attention=False))
    assert not any("attn" in k for k in no_attn.state_dict())
    with torch.no_grad():
        assert no_attn(_images()).recon.shape == (2, 3, 32, 32)


def test_prefixed_original_state_dict_loads_strictly() -> None:
    source = _randomize(Autoencoder(TOY_KL), seed=3)
    checkpoint = {"first_stage_model." + k: v for k, v in source.state_dict().items()}
    target = Autoencoder(TOY_KL).eval()
    prefix = "first_stage_model."
    target.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.items()}, strict=True)
    x = _images()
    with torch.no_grad():
        loaded, original = target.encode(x), source.encode(x)
    assert isinstance(loaded, DiagonalGaussian) and isinstance(original, DiagonalGaussian)
    assert torch.equal(loaded.mean, original.mean)


class _Shapes(dict[str, tuple[int, ...]]):
    """Key -> shape, filled in original-layout terms."""

    def conv(self, name: str, cin: int, cout: int, k: int) -> None:
        self[f"{name}.weight"], self[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(self, name: str, c: int) -> None:
        self[f"{name}.weight"] = self[f"{name}.bias"] = (c,)

    def resnet(self, name: str, cin: int, cout: int) -> None:
        self.norm(f"{name}.norm1", cin)
        self.conv(f"{name}.conv1", cin, cout, 3)
        self.norm(f"{name}.norm2", cout)
        self.conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            self.conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(self, part: str) -> None:
        self.resnet(f"{part}.mid.block_1", 512, 512)
        self.norm(f"{part}.mid.attn_1.norm", 512)
        for n in ("q", "k", "v", "proj_out"):
            self.conv(f"{part}.mid.attn_1.{n}", 512, 512, 1)
        self.resnet(f"{part}.mid.block_2", 512, 512)


def _expected_kl_f8_shapes() -> dict[str, tuple[int, ...]]:
    """The kl-f8 key list written out from ldm-facts §4.1 (independently of the module code)."""
    shapes, widths = _Shapes(), [128, 256, 512, 512]
    shapes.conv("encoder.conv_in", 3, 128, 3)
    for i in range(4):
        for j in range(2):
            cin = ([128] + widths)[i] if j == 0 else widths[i]
            shapes.resnet(f"encoder.down.{i}.block.{j}", cin, widths[i])
        if i < 3:
            shapes.conv(f"encoder.down.{i}.downsample.conv", widths[i], widths[i], 3)
    shapes.mid("encoder")
    shapes.norm("encoder.norm_out", 512)
    shapes.conv("encoder.conv_out", 512, 8, 3)
    shapes.conv("quant_conv", 8, 8, 1)
    shapes.conv("post_quant_conv", 4, 4, 1)
    shapes.conv("decoder.conv_in", 4, 512, 3)
    shapes.mid("decoder")
    for i in range(4):
        for j in range(3):
            cin = (widths + [512])[i + 1] if j == 0 else widths[i]
            shapes.resnet(f"decoder.up.{i}.block.{j}", cin, widths[i])
        if i > 0:
            shapes.conv(f"decoder.up.{i}.upsample.conv", widths[i], widths[i], 3)
    shapes.norm("decoder.norm_out", 128)
    shapes.conv("decoder.conv_out", 128, 3, 3)
    return dict(shapes)


def test_sd_kl_f8_keys_shapes_and_count() -> None:
    with torch.device("meta"):
        model = Autoencoder(AutoencoderConfig())
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == _expected_kl_f8_shapes()
    assert actual["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert actual["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in actual


@pytest.mark.parametrize(
    ("config", "millions"),
    [  # ldm-facts §2.3: the released first-stage configs
        (AutoencoderConfig(ch_mult=(1, 2, 4), z_channels=3, embed_dim=3), 55.31),
        (AutoencoderConfig(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=16, embed_dim=16),
         69.61),
        (AutoencoderConfig(ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16, 8), z_channels=64, embed_dim=64),
         103.88),
        (AutoencoderConfig(kind="vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192), 55.32),
        (AutoencoderConfig(kind="vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192,
                           mid_attention=False), 53.22),
        (AutoencoderConfig(kind="vq", ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=16384), 67.72),
        (AutoencoderConfig(kind="vq", ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=256), 67.65),
        (AutoencoderConfig(kind="vq", ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=8,
                           embed_dim=8, n_embed=16384), 69.59),
    ],
)
def test_released_first_stage_parameter_counts(config: AutoencoderConfig, millions: float) -> None:
    with torch.device("meta"):
        model = Autoencoder(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
