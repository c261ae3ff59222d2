"""`ldm train autoencoder`: the first stage (PAPER §3.1, App. G), KL- or VQ-regularised.

Loss = L1 + w_p * LPIPS (as one NLL with a learned log-variance) + w_kl * KL (or the codebook loss), and
after `disc_start` a PatchGAN hinge loss whose generator term is weighted adaptively (Esser et al.'s
taming-transformers recipe, used by LDM). The discriminator has its own optimiser and step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.checkpoints import CONFIG_METADATA_KEY, read_model_config, read_state_dict, split_parts
from models.config import to_dict
from models.resolve import pick_device
from models.train.common import (
    LossLog,
    load_checkpoint,
    psnr,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_lr,
    set_rng_state,
    ssim,
    warmup_lr,
    write_resolved_config,
)
from models.train.data import DataConfig, ImageSource, make_sources
from models.train.grid import save_grid
from models.train.losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    autoencoder: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3, resolution=64))
    data: DataConfig = field(default_factory=DataConfig)
    #: start from these weights (an `autoencoder.safetensors` of an earlier run, or the first stage of a complete
    #: model file such as a shipped one) instead of a random init
    init_from: str | None = None
    #: False trains the decoder only: the latent space stays exactly as it was, so a diffusion model
    #: trained on it stays valid (how SD's VAE decoder was fine-tuned after the fact)
    train_encoder: bool = True
    steps: int = 3000
    batch_size: int = 16
    #: train on random square crops of this side (cheaper per image); None = whole images. Beware: GroupNorm
    #: takes its statistics over the whole image, so crops shift them (colours drift on whole images)
    crop_size: int | None = None
    lr: float = 5e-4
    #: Adam betas of the autoencoder (the original's GAN-style (0.5, 0.9) suits the adversarial phase)
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 100
    #: from this step the learning rate falls linearly to a tenth of `lr` at `steps` (None = constant)
    lr_decay_start: int | None = None
    #: the pixel loss: l1 (the original's) or l2, the squared error that PSNR measures (a decoder-only fine-tune
    #: after an l1 run: models/train/configs/tiny-shapes-decoder-ft2.yaml)
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    #: KL only: each image's latent gets Gaussian noise of a std drawn uniformly from [0, latent_noise] before it is
    #: decoded (the target stays the clean image), so the decoder learns to draw clean images from the slightly
    #: off latents a diffusion model ends on, instead of drawing their error as speckles; 0 = off
    latent_noise: float = 0.0
    #: weight of the KL term (KL autoencoders; the paper's kl-f* use 1e-6)
    kl_weight: float = 1e-6
    #: initial bias of the posterior's log-variance (KL): at the default init (0) every latent carries noise of
    #: std ~1 and the decoder learns blur until the encoder has pushed it down, which took most of a short
    #: run here (std still 0.83 after 400 steps, 14 dB); starting near-deterministic skips that phase.
    #: None keeps the default init
    posterior_logvar_init: float | None = -8.0
    #: weight of the codebook term (VQ autoencoders)
    codebook_weight: float = 1.0
    #: LPIPS weight; used only when both weight files are given (they cannot be downloaded here)
    perceptual_weight: float = 1.0
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    #: the discriminator joins at this step (before it, pure reconstruction)
    disc_start: int = 2000
    disc_weight: float = 0.5
    disc_width: int = 64
    disc_layers: int = 2
    disc_lr: float | None = None  # default: lr
    grad_clip: float = 1.0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    eval_every: int = 500
    eval_images: int = 128
    seed: int = 0
    device: str | None = None


class AutoencoderTrainer:
    """One run in `run_dir`; `train()` resumes from `run_dir/checkpoints/last.pt` when it exists."""

    def __init__(self, config: AutoencoderTrainConfig, run_dir: Path) -> None:
        self.config, self.run_dir = config, run_dir
        self.device = pick_device(config.device)
        seed_everything(config.seed)
        self.model = Autoencoder(config.autoencoder).to(self.device)
        if config.init_from is not None:
            start = load_first_stage(Path(config.init_from))
            if start.config != config.autoencoder:
                raise ValueError(f"init_from {config.init_from}: its autoencoder config differs from this run's")
            self.model.load_state_dict(start.state_dict())
        elif config.posterior_logvar_init is not None and config.autoencoder.kind == "kl":
            bias = self.model.quant_conv.bias
            assert bias is not None
            with torch.no_grad():
                bias[config.autoencoder.embed_dim:].fill_(config.posterior_logvar_init)
        if not config.train_encoder:
            for frozen in (self.model.encoder, self.model.quant_conv):
                frozen.requires_grad_(False)
        self.disc = PatchDiscriminator(config.autoencoder.out_channels, config.disc_width, config.disc_layers).to(
            self.device)
        self.logvar = nn.Parameter(torch.zeros((), device=self.device))
        self.perceptual = self._perceptual()
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam([*trained, self.logvar], lr=config.lr, betas=config.betas)
        self.opt_disc = torch.optim.Adam(self.disc.parameters(), lr=config.disc_lr or config.lr, betas=(0.5, 0.9))
        self.train_data, self.heldout = make_sources(config.data)
        self.step = 0
        self.best_psnr = float("-inf")

    def _perceptual(self) -> LPIPS | None:
        c = self.config
        if c.perceptual_weight > 0 and c.vgg_weights and c.lpips_weights:
            log.info("perceptual loss: LPIPS(VGG16) from %s and %s", c.vgg_weights, c.lpips_weights)
            return LPIPS.from_files(Path(c.vgg_weights), Path(c.lpips_weights)).to(self.device)
        log.warning("perceptual loss OFF: no local LPIPS/VGG16 weights given (vgg_weights, lpips_weights); "
                    "training with L1 + regulariser + adversarial loss only")
        return None

    # ------------------------------------------------------------------------------------- state
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "model": self.model.state_dict(), "disc": self.disc.state_dict(),
            "logvar": self.logvar.detach().clone(), "opt": self.opt.state_dict(),
            "opt_disc": self.opt_disc.state_dict(), "rng": rng_state(), "config": to_dict(self.config),
            "best_psnr": self.best_psnr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["disc"])
        with torch.no_grad():
            self.logvar.copy_(state["logvar"])
        self.opt.load_state_dict(state["opt"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.best_psnr = state["best_psnr"]

    # -------------------------------------------------------------------------------------- loss
    def _regulariser(self, out: Any) -> Tensor:
        if out.posterior is not None:
            kl: Tensor = self.config.kl_weight * out.posterior.kl().mean()
            return kl
        codebook: Tensor = self.config.codebook_weight * out.vq_loss
        return codebook

    def _crop(self, images: Tensor) -> Tensor:
        """Per-image random crops (offsets from the global RNG, which checkpoints restore)."""
        size = self.config.crop_size
        if size is None or size >= images.shape[-1]:
            return images
        offsets = torch.randint(0, images.shape[-1] - size + 1, (images.shape[0], 2))
        return torch.stack([im[:, y:y + size, x:x + size] for im, (y, x) in zip(images, offsets.tolist(), strict=True)])

    def train_step(self, images: Tensor) -> dict[str, float]:
        c = self.config
        images = self._crop(images).to(self.device)
        self.model.train()
        if not c.train_encoder:
            self.model.encoder.eval()  # frozen: no dropout either
        out = self.model(images)
        if c.latent_noise > 0:
            if out.posterior is None:
                raise ValueError("latent_noise needs a KL autoencoder")
            z = out.posterior.sample()
            sigma = c.latent_noise * torch.rand(z.shape[0], 1, 1, 1, device=z.device)
            out = dataclasses.replace(out, recon=self.model.decode(z + sigma * torch.randn_like(z)))
        error = images - out.recon
        rec = error.abs() if c.reconstruction_loss == "l1" else error.square()
        if self.perceptual is not None:
            rec = rec + c.perceptual_weight * self.perceptual(images, out.recon)[:, None, None, None]
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / images.shape[0]
        loss = nll + self._regulariser(out)
        stats = {"l1": (images - out.recon).abs().mean().item(), "nll": nll.item(), "logvar": self.logvar.item()}
        use_disc = self.step >= c.disc_start and c.disc_weight > 0
        if use_disc:
            g_loss = -self.disc(out.recon).mean()
            weight = adaptive_weight(nll, g_loss, self.model.decoder.conv_out.weight, c.disc_weight)
            loss = loss + weight * g_loss
            stats.update(g_loss=g_loss.item(), d_weight=weight.item())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), self.logvar], c.grad_clip)
        self.opt.step()
        if use_disc:
            d_loss = hinge_d_loss(self.disc(images), self.disc(out.recon.detach()))
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_disc.step()
            stats["d_loss"] = d_loss.item()
        stats["loss"] = loss.item()
        return stats

    @torch.no_grad()
    def evaluate(self, source: ImageSource | None = None, count: int | None = None) -> dict[str, float]:
        """Reconstruction PSNR / SSIM (posterior mode, or quantised VQ latents) on held-out images."""
        source = source or self.heldout
        count = count or self.config.eval_images
        self.model.eval()
        psnrs, ssims = [], []
        for first in range(0, count, 32):
            images, _ = source.batch(first, min(32, count - first))
            images = images.to(self.device)
            recon = self.model(images, sample_posterior=False).recon
            psnrs.append(psnr(recon, images))
            ssims.append(ssim(recon, images))
        return {"psnr": torch.cat(psnrs).mean().item(), "ssim": torch.cat(ssims).mean().item()}

    # -------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        c = self.config
        resumed = self.checkpoint_path.is_file()
        if resumed:
            self.load_state_dict(load_checkpoint(self.checkpoint_path))
            log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        write_resolved_config(self.run_dir, c, {"perceptual_loss": self.perceptual is not None})
        fields = ("loss", "l1", "nll", "logvar", "g_loss", "d_weight", "d_loss", "psnr", "ssim", "lr")
        losslog = LossLog(self.run_dir / "log.csv", fields, resume_step=self.step if resumed else None)
        bar = tqdm(total=c.steps, initial=self.step, desc="autoencoder", unit="step", dynamic_ncols=True)
        started, first_step = time.monotonic(), self.step
        while self.step < c.steps:
            lr = warmup_lr(self.step, c.lr, c.warmup_steps, c.lr_decay_start, c.steps)
            set_lr(self.opt, lr)
            images, _ = self.train_data.batch(self.step * c.batch_size, c.batch_size)
            stats = self.train_step(images)
            self.step += 1
            bar.update(1)
            speed = (self.step - first_step) * c.batch_size / (time.monotonic() - started)
            bar.set_postfix(l1=f"{stats['l1']:.4f}", img_s=f"{speed:.1f}")
            if self.step % c.eval_every == 0 or self.step == c.steps:
                stats.update(self.evaluate())
                log.info("step %d: held-out PSNR %.2f dB, SSIM %.4f", self.step, stats["psnr"], stats["ssim"])
                if stats["psnr"] > self.best_psnr:  # model selection on held-out images
                    self.best_psnr = stats["psnr"]
                    self.export(self.run_dir / "autoencoder-best.safetensors", {"psnr": stats["psnr"],
                                                                                "ssim": stats["ssim"]})
            if self.step % c.log_every == 0 or "psnr" in stats:
                losslog.write(self.step, {**stats, "lr": lr})
            if self.step % c.sample_every == 0 or self.step == c.steps:
                self._save_samples()
            if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                save_checkpoint(self.checkpoint_path, self.state_dict())
        bar.close()
        result = self.evaluate()
        self.export(self.run_dir / "autoencoder.safetensors", result)
        return result

    def _save_samples(self) -> None:
        images, _ = self.heldout.batch(0, 8)
        with torch.no_grad():
            self.model.eval()
            recon = self.model(images.to(self.device), sample_posterior=False).recon.cpu()
        save_grid(torch.cat([images, recon]), self.run_dir / "samples" / f"recon-{self.step:07d}.png", rows=2)

    def export(self, path: Path, metrics: dict[str, float]) -> None:
        """The trained autoencoder alone (weights + its config in the metadata), for `ldm train ldm`."""
        import json

        meta = {"autoencoder_config": json.dumps(to_dict(self.config.autoencoder)), "step": str(self.step),
                "metrics": json.dumps(metrics), "perceptual_loss": str(self.perceptual is not None)}
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path), metadata=meta)
        log.info("wrote %s (held-out PSNR %.2f dB)", path, metrics["psnr"])


def load_trained_autoencoder(path: Path) -> Autoencoder:
    """An autoencoder written by `AutoencoderTrainer.export`."""
    import json

    from safetensors.torch import load_file

    from models.config import from_dict

    if not path.is_file():
        raise FileNotFoundError(f"autoencoder file {path} does not exist (train one with `ldm train autoencoder`)")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "autoencoder_config" not in meta:
        raise ValueError(f"{path} has no autoencoder_config metadata: not written by `ldm train autoencoder`")
    config = from_dict(AutoencoderConfig, json.loads(meta["autoencoder_config"]))
    model = Autoencoder(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def load_first_stage(path: Path) -> Autoencoder:
    """An autoencoder written by `ldm train autoencoder`, or the first stage of a complete model file."""
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if CONFIG_METADATA_KEY in meta and "autoencoder_config" not in meta:
            config = read_model_config(path)
            autoencoder = Autoencoder(config.autoencoder)
            autoencoder.load_state_dict(split_parts(read_state_dict(path)[0])["autoencoder"], strict=True)
            return autoencoder.eval()
    return load_trained_autoencoder(path)
