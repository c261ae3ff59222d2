"""Both training loops on tiny models: a step lowers the loss on its batch, resume equals an
uninterrupted run bit for bit, and bad inputs give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.autoencoder import AutoencoderConfig
from models.checkpoints import load_model
from models.conditioners import ConditionerConfig
from models.train.autoencoder_trainer import AutoencoderTrainConfig, AutoencoderTrainer, load_trained_autoencoder
from models.train.common import load_checkpoint
from models.train.data import DataConfig
from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer
from models.unet import UNetConfig
from tests.helpers import assert_steps_lower_the_loss, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_AE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, embed_dim=3, resolution=64,
                            mid_attention=False)
TINY_UNET = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(2,), num_heads=2, context_dim=384)


def ae_config(**kw: object) -> AutoencoderTrainConfig:
    base = dict(autoencoder=TINY_AE, steps=2, batch_size=2, crop_size=32, lr=1e-3, warmup_steps=1, disc_start=1,
                disc_width=16, eval_images=4, log_every=1, sample_every=100, checkpoint_every=100, eval_every=100)
    base.update(kw)
    return AutoencoderTrainConfig(**base)  # type: ignore[arg-type]


def ldm_config(autoencoder: Path, **kw: object) -> LDMTrainConfig:
    base = dict(autoencoder_path=str(autoencoder), unet=TINY_UNET,
                conditioner=ConditionerConfig(kind="minilm", max_length=12), steps=2, batch_size=4, lr=1e-3,
                warmup_steps=1, latent_pool=16, scale_images=8, log_every=1, sample_every=100,
                checkpoint_every=100, sample_steps=2, sample_prompts=("a red circle", "a blue square"))
    base.update(kw)
    return LDMTrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ae")
    with torch_threads(1):
        AutoencoderTrainer(ae_config(steps=1), run).train()
    return run / "autoencoder.safetensors"


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_step_changes_weights_and_lowers_loss(tmp_path: Path, kind: str) -> None:
    ae = AutoencoderConfig(**{**TINY_AE.__dict__, "kind": kind, "n_embed": 64 if kind == "vq" else 0})
    trainer = AutoencoderTrainer(ae_config(autoencoder=ae, disc_start=10**6, lr=2e-4), tmp_path)
    images, _ = trainer.train_data.batch(0, 4)
    before = _weights(trainer.model)

    def l1() -> float:
        with torch.no_grad():
            return (trainer.model(images, sample_posterior=False).recon - images).abs().mean().item()

    first = l1()
    for _ in range(3):
        trainer.train_step(images)
    assert l1() < first
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "decoder.conv_out.weight" in changed and "encoder.conv_in.weight" in changed


def test_autoencoder_adversarial_phase_trains_the_discriminator(tmp_path: Path) -> None:
    trainer = AutoencoderTrainer(ae_config(disc_start=0), tmp_path)
    disc_before = _weights(trainer.disc)
    images, _ = trainer.train_data.batch(0, 2)
    stats = trainer.train_step(images)
    assert {"g_loss", "d_weight", "d_loss"} <= set(stats) and stats["d_weight"] >= 0
    assert any(not torch.equal(v, disc_before[k]) for k, v in trainer.disc.state_dict().items())


def test_autoencoder_resume_equals_uninterrupted(tmp_path: Path) -> None:
    whole = AutoencoderTrainer(ae_config(steps=4), tmp_path / "whole")
    whole.train()
    AutoencoderTrainer(ae_config(steps=2), tmp_path / "cut").train()
    resumed = AutoencoderTrainer(ae_config(steps=4), tmp_path / "cut")
    resumed.train()
    a, b = load_checkpoint(whole.checkpoint_path), load_checkpoint(resumed.checkpoint_path)
    assert a["step"] == b["step"] == 4
    for part in ("model", "disc"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["logvar"], b["logvar"])
    # the loss log holds each step once, in order, across the cut
    steps = [int(line.split(",")[0]) for line in (tmp_path / "cut" / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    exported = load_trained_autoencoder(tmp_path / "cut" / "autoencoder.safetensors")
    assert torch.equal(exported.decoder.conv_out.weight, b["model"]["decoder.conv_out.weight"])


def test_autoencoder_reports_reconstruction_quality(tmp_path: Path) -> None:
    trainer = AutoencoderTrainer(ae_config(), tmp_path)
    metrics = trainer.evaluate()
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1
    # a perfect reconstruction: SSIM 1, PSNR at its cap
    from models.train.common import psnr, ssim

    x = trainer.heldout.batch(0, 2)[0]
    assert torch.allclose(ssim(x, x), torch.ones(2)) and (psnr(x, x) > 100).all()


def test_ldm_step_changes_weights_and_lowers_loss(tmp_path: Path, trained_autoencoder: Path) -> None:
    trainer = LDMTrainer(ldm_config(trained_autoencoder, cond_drop=0.0, lr=5e-4), tmp_path)
    latents, texts = trainer._batch(0, 4)
    before = _weights(trainer.unet)
    assert_steps_lower_the_loss(trainer, latents, texts)
    assert all(not torch.equal(v, before[k]) for k, v in trainer.unet.state_dict().items()
               if k.endswith("weight") and "norm" not in k and "emb" not in k)


def test_ldm_measures_the_scale_factor(tmp_path: Path, trained_autoencoder: Path) -> None:
    trainer = LDMTrainer(ldm_config(trained_autoencoder), tmp_path)
    latents, _ = trainer._batch(0, 16)
    assert trainer.model.config.scale_factor != 1.0
    assert 0.5 < latents.std().item() < 2.0  # unit variance, roughly, as the paper's rescaling intends


def test_ldm_resume_equals_uninterrupted(tmp_path: Path, trained_autoencoder: Path) -> None:
    LDMTrainer(ldm_config(trained_autoencoder, steps=4), tmp_path / "whole").train()
    LDMTrainer(ldm_config(trained_autoencoder, steps=2), tmp_path / "cut").train()
    LDMTrainer(ldm_config(trained_autoencoder, steps=4), tmp_path / "cut").train()
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4 and a["scale_factor"] == b["scale_factor"]
    for key, value in a["unet"].items():
        assert torch.equal(value, b["unet"][key]), key
    for key, value in a["ema"]["shadow"].items():
        assert torch.equal(value, b["ema"]["shadow"][key]), f"ema {key}"
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 4
    exp_a = a["opt"]["state"][0]["exp_avg"]
    assert torch.equal(exp_a, b["opt"]["state"][0]["exp_avg"])


def test_ldm_run_writes_a_loadable_model_with_ema_weights(tmp_path: Path, trained_autoencoder: Path) -> None:
    config = ldm_config(trained_autoencoder, steps=2, sample_every=2, name="toy")
    LDMTrainer(config, tmp_path).train()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "samples" / "step-0000002.png").is_file()
    model = load_model(tmp_path / "model.safetensors")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    key = "out.2.weight"
    assert torch.equal(model.unet.state_dict()[key], state["ema"]["shadow"][key])
    assert model.config.name == "toy" and model.config.scale_factor == state["scale_factor"]


def test_ldm_needs_an_autoencoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trained autoencoder"):
        LDMTrainer(LDMTrainConfig(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LDMTrainer(LDMTrainConfig(autoencoder_path=str(tmp_path / "none.safetensors")), tmp_path)


def test_folder_data_needs_a_path() -> None:
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(kind="folder")


def test_decoder_fine_tune_keeps_the_latent_space(tmp_path: Path, trained_autoencoder: Path) -> None:
    trainer = AutoencoderTrainer(ae_config(init_from=str(trained_autoencoder), train_encoder=False, steps=2,
                                           disc_start=10**6), tmp_path / "ft")
    start = load_trained_autoencoder(trained_autoencoder)
    trainer.train()
    tuned = load_trained_autoencoder(tmp_path / "ft" / "autoencoder.safetensors")
    for key, value in start.encoder.state_dict().items():
        assert torch.equal(value, tuned.encoder.state_dict()[key]), key
    assert not torch.equal(start.decoder.conv_out.weight, tuned.decoder.conv_out.weight)

    # the diffusion model accepts the fine-tuned decoder for export, but not an unrelated first stage
    config = ldm_config(trained_autoencoder, export_autoencoder_path=str(tmp_path / "ft" / "autoencoder.safetensors"))
    LDMTrainer(config, tmp_path / "ldm").train()
    exported = load_model(tmp_path / "ldm" / "model.safetensors")
    assert torch.equal(exported.autoencoder.decoder.conv_out.weight, tuned.decoder.conv_out.weight)
    other = tmp_path / "other"
    AutoencoderTrainer(ae_config(steps=1, seed=5), other).train()
    stranger = ldm_config(trained_autoencoder, export_autoencoder_path=str(other / "autoencoder.safetensors"))
    with pytest.raises(ValueError, match="encoder differs"):
        LDMTrainer(stranger, tmp_path / "ldm2").train()


def test_swap_decoder_puts_a_decoder_fine_tune_into_finished_files_and_keeps_the_rest(
        tmp_path: Path, trained_autoencoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ldm train swap-decoder`: the shipped files were made before their decoder was fine-tuned. Only the decoder
    changes; the UNet's fp16 storage, the conditioner and the config metadata stay as they were; a file of another
    first stage is refused by name, and left as it was."""
    import safetensors
    from safetensors.torch import load_file, save_file

    from service.cli import main

    LDMTrainer(ldm_config(trained_autoencoder), tmp_path / "ldm").train()
    path = tmp_path / "ldm" / "model.safetensors"
    stored = load_file(str(path))
    stored = {k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in stored.items()}
    metadata = safetensors.safe_open(str(path), "pt").metadata()
    save_file(stored, str(path), metadata=metadata)  # as the shipped files: UNet in fp16
    # the fine-tune may start from the model file itself (its first stage), as the shipped decoder's did
    AutoencoderTrainer(ae_config(init_from=str(path), train_encoder=False, steps=1,
                                 disc_start=10**6, reconstruction_loss="l2"), tmp_path / "ft").train()
    decoder = tmp_path / "ft" / "autoencoder.safetensors"
    assert main(["train", "swap-decoder", "--decoder", str(decoder), str(path)]) == 0

    after = load_file(str(path))
    tuned = load_trained_autoencoder(decoder).state_dict()
    assert set(after) == set(stored) and safetensors.safe_open(str(path), "pt").metadata() == metadata
    for key, value in after.items():
        name = key.removeprefix("first_stage_model.")
        if key.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")):  # latents -> pixels
            assert torch.equal(value, tuned[name]), key
        else:
            assert value.dtype == stored[key].dtype and torch.equal(value, stored[key]), key
    assert not torch.equal(after["first_stage_model.decoder.conv_out.weight"],
                           stored["first_stage_model.decoder.conv_out.weight"])
    assert load_model(path).config == load_model(tmp_path / "ldm" / "model.safetensors").config

    other = tmp_path / "other"
    AutoencoderTrainer(ae_config(steps=1, seed=5), other).train()
    before = path.read_bytes()
    assert main(["train", "swap-decoder", "--decoder", str(other / "autoencoder.safetensors"), str(path)]) == 2
    assert "its encoder differs from the fine-tune's" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_an_l2_reconstruction_loss_lowers_the_squared_error(tmp_path: Path) -> None:
    """`reconstruction_loss: l2` optimises what PSNR measures (the shipped decoder's fine-tune)."""
    trainer = AutoencoderTrainer(ae_config(disc_start=10**6, lr=2e-4, reconstruction_loss="l2"), tmp_path)
    images, _ = trainer.train_data.batch(0, 4)

    def mse() -> float:
        with torch.no_grad():
            return (trainer.model(images, sample_posterior=False).recon - images).square().mean().item()

    first = mse()
    for _ in range(3):
        trainer.train_step(images)
    assert mse() < first
    with pytest.raises((ValueError, TypeError), match="reconstruction_loss"):
        from models.config import from_dict

        from_dict(AutoencoderTrainConfig, {"autoencoder": {"kind": "kl"}, "reconstruction_loss": "l3"})


def test_latent_noise_trains_the_decoder_on_noised_latents_toward_the_clean_image(tmp_path: Path) -> None:
    """`latent_noise`: the decoder sees latents with noise added and is pulled toward the clean image, which lowers
    its error on noised latents (a diffusion model's final latents are such); a VQ autoencoder refuses it."""
    trainer = AutoencoderTrainer(ae_config(disc_start=10**6, lr=2e-4, train_encoder=False, latent_noise=0.5,
                                           reconstruction_loss="l2"), tmp_path)
    images, _ = trainer.train_data.batch(0, 4)
    noise = torch.Generator().manual_seed(0)

    def noised_error() -> float:
        with torch.no_grad():
            z = trainer.model.encode(images).mode()  # type: ignore[union-attr]
            z = z + 0.25 * torch.randn(z.shape, generator=noise.manual_seed(0))
            return (trainer.model.decode(z) - images).square().mean().item()

    first = noised_error()
    for _ in range(3):
        trainer.train_step(images)
    assert noised_error() < first
    vq = AutoencoderConfig(**{**TINY_AE.__dict__, "kind": "vq", "n_embed": 64})
    with pytest.raises(ValueError, match="latent_noise needs a KL autoencoder"):
        AutoencoderTrainer(ae_config(autoencoder=vq, disc_start=10**6, latent_noise=0.5), tmp_path / "vq").train_step(
            images)


def test_pixel_space_diffusion_trains_without_a_first_stage(tmp_path: Path) -> None:
    unet = UNetConfig(**{**TINY_UNET.__dict__, "attention_resolutions": (4,)})
    trainer = LDMTrainer(ldm_config(Path("pixel"), unet=unet), tmp_path)
    latents, _ = trainer._batch(0, 2)
    assert latents.shape == (2, 3, 64, 64)  # the pixels, rescaled
    assert trainer.model.config.downsample_factor == 1
    trainer.train()
    assert load_model(tmp_path / "model.safetensors").config.autoencoder.kind == "identity"


def test_ldm_init_from_starts_the_unet_from_an_earlier_run(tmp_path: Path, trained_autoencoder: Path) -> None:
    first = LDMTrainer(ldm_config(trained_autoencoder), tmp_path / "first")
    first.train()
    exported = load_model(str(tmp_path / "first" / "model.safetensors"))
    second = LDMTrainer(ldm_config(trained_autoencoder, init_from=str(tmp_path / "first" / "model.safetensors"),
                                   seed=7), tmp_path / "second")
    for key, value in exported.unet.state_dict().items():
        assert torch.equal(second.unet.state_dict()[key], value), key
    for key, value in second.ema.shadow.items():  # the average starts from the loaded weights, not a random init
        assert torch.equal(value, exported.unet.state_dict()[key].float()), key


def test_ldm_init_from_refuses_a_different_unet(tmp_path: Path, trained_autoencoder: Path) -> None:
    LDMTrainer(ldm_config(trained_autoencoder), tmp_path / "first").train()
    wider = UNetConfig(**{**TINY_UNET.__dict__, "model_channels": 64})
    with pytest.raises(ValueError, match="UNet config differs"):
        LDMTrainer(ldm_config(trained_autoencoder, unet=wider, init_from=str(tmp_path / "first" / "model.safetensors")),
                   tmp_path / "second")


def test_low_noise_fraction_draws_that_part_of_each_batch_from_the_last_noise_levels(
        tmp_path: Path, trained_autoencoder: Path) -> None:
    trainer = LDMTrainer(ldm_config(trained_autoencoder, batch_size=8, steps=3, low_noise_fraction=0.5,
                                    low_noise_max_t=10), tmp_path)
    seen: list[torch.Tensor] = []
    trainer.unet.register_forward_pre_hook(lambda _module, args: seen.append(args[1].clone()))
    trainer.train()
    steps = [t for t in seen if t.shape == (8,)]  # the rest: the final sample grid's calls (2 prompts, guided)
    assert len(steps) == 3
    for t in steps:
        assert bool((t[:4] < 10).all())
    assert max(int(t[4:].max()) for t in steps) >= 10  # the rest stays uniform on all 1000 (all 12 below 10: 1e-24)
    with pytest.raises(ValueError, match="low_noise_fraction must be in"):
        ldm_config(trained_autoencoder, low_noise_fraction=1.5)
    with pytest.raises(ValueError, match="low_noise_max_t must be in 1..1000"):
        ldm_config(trained_autoencoder, low_noise_max_t=0)
