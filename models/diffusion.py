"""The forward (noising) process of a discrete-time diffusion model and the training loss of LDM Eq. 1.

Notation: `abar_t` = alpha-bar = prod_{s<=t} (1 - beta_s); the forward process is
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in {0, ..., T-1} (T = 1000 for every released LDM/SD model).

Values are computed exactly as diffusers computes them (fp32 betas, fp32 cumprod), so alpha-bar matches
diffusers' schedulers bit for bit; the sampling plans in `models/samplers.py` rely on that for parity.
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule of a model, in diffusers' naming (scheduler_config.json fields).

    Beware the name clash: CompVis configs say `linear` (betas = linspace(sqrt(start), sqrt(end), T)^2),
    which diffusers (and this class) calls **`scaled_linear`**; diffusers' `linear` is a plain
    linspace(start, end, T) (CompVis `sqrt_linear`). `cosine` is Nichol & Dhariwal's schedule, diffusers'
    `squaredcos_cap_v2` (betas capped at 0.999). The defaults are SD v1's: CompVis `linear`,
    0.00085 -> 0.012, 1000 steps, epsilon prediction, "leading" spacing with steps_offset 1.

    `steps_offset` and `timestep_spacing` only shape the inference timesteps (see `samplers.sampling_plan`).

    `rescale_betas_zero_snr` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Alg. 1; diffusers' `rescale_zero_terminal_snr`): the betas are rescaled so that sqrt(alpha-bar) falls linearly
    to exactly 0 at the last timestep (zero terminal SNR) and keeps its first value. At alpha-bar 0, x_t is pure
    noise and epsilon says nothing of x0, so such a model must predict v (x0 = -v there): the samplers then take
    v itself and convert it per step (`samplers.SamplingPlan.model_output`).
    """

    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: PredictionType = "epsilon"
    steps_offset: int = 1
    timestep_spacing: TimestepSpacing = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        for field, choices in (
            ("beta_schedule", BetaSchedule),
            ("prediction_type", PredictionType),
            ("timestep_spacing", TimestepSpacing),
        ):
            if getattr(self, field) not in get_args(choices):
                raise ValueError(f"{field} must be one of {get_args(choices)}, got {getattr(self, field)!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr needs prediction_type 'v_prediction': at zero terminal SNR an "
                             f"epsilon prediction carries no x0, got {self.prediction_type!r}")


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) cosine schedule, discretised as diffusers' `betas_for_alpha_bar` does
    (float64 Python arithmetic, then fp32): beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(config: ScheduleConfig) -> Tensor:
    """Betas [T] in fp32, computed like diffusers (CompVis computes `linear` in float64 and casts; the two
    differ by about one fp32 ulp, and we follow diffusers because its pipelines are our parity target)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(T)
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024) Alg. 1, diffusers' arithmetic: shift sqrt(alpha-bar) [T] to end at 0 and scale it to keep
    its first value, then recover the betas (the last is 1, so alpha-bar's last entry is exactly 0)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule: betas, alphas = 1 - betas and alphas_cumprod (alpha-bar), each [T] fp32
    on the CPU (samplers take 0-dim entries of these, which combine with tensors on any device)."""

    config: ScheduleConfig
    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> "NoiseSchedule":
        betas = make_betas(config)
        alphas = 1.0 - betas
        return cls(config=config, betas=betas, alphas=alphas, alphas_cumprod=torch.cumprod(alphas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> PredictionType:
        return self.config.prediction_type

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps: [n] int64, uniform on {0, ..., T-1} (LDM trains every t with equal weight),
        drawn on the generator's device."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    def abar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha-bar at integer timesteps t [N], shaped [N, 1, ..., 1] to broadcast against `like`
        [N, ...] and cast to its device and dtype (as diffusers' `add_noise` does)."""
        abar = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device).long()]
        return abar.reshape(-1, *([1] * (like.ndim - 1)))

    def eps_from_v(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """eps implied by a v prediction v [N, ...] at x_t [N, ...], timesteps t [N] (whole numbers:
        a fractional t is truncated; Karras plans round theirs, so there the level is approximate)."""
        return v_to_eps(v, x_t, self.abar_at(t, x_t))

    def x0_from_v(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0 implied by a v prediction at x_t, timesteps t [N] (as `eps_from_v`)."""
        return v_to_x0(v, x_t, self.abar_at(t, x_t))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Sample q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I). x0, noise [N, C, H, W]; t [N] int.
    Same arithmetic as diffusers' `add_noise`, so the result matches it bit for bit."""
    abar = schedule.abar_at(t, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def v_target(x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """The v-prediction target (Salimans & Ho 2022): v = sqrt(abar) eps - sqrt(1 - abar) x0.
    `abar` broadcasts against x0 (e.g. [N, 1, 1, 1] from `NoiseSchedule.abar_at`)."""
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


def v_to_eps(v: Tensor, x_t: Tensor, abar: Tensor) -> Tensor:
    """eps implied by a v prediction at x_t: eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    return abar**0.5 * v + (1 - abar) ** 0.5 * x_t


def v_to_x0(v: Tensor, x_t: Tensor, abar: Tensor) -> Tensor:
    """x0 implied by a v prediction at x_t: x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return abar**0.5 * x_t - (1 - abar) ** 0.5 * v


def eps_to_x0(eps: Tensor, x_t: Tensor, abar: Tensor) -> Tensor:
    """x0 implied by an eps prediction at x_t: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    *,
    loss_type: Literal["l2", "l1"] = "l2",
) -> Tensor:
    """LDM Eq. 1: E ||eps - eps_theta(z_t, t)||^2 (mean over all elements), with z_t = q_sample(z0, t, eps).

    model_output [N, C, H, W] is the network's prediction at z_t; the target is `noise` for epsilon
    models and v_target for v-prediction models. `loss_type="l1"` is the L1 variant some LDM configs use.
    CompVis' loss is loss_simple / exp(logvar_t) + logvar_t with logvar fixed at 0, i.e. exactly this.
    """
    if loss_type not in ("l2", "l1"):
        raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
    target = noise if schedule.config.prediction_type == "epsilon" else v_target(x0, noise, schedule.abar_at(t, x0))
    if loss_type == "l1":
        return F.l1_loss(model_output.float(), target.float())
    return F.mse_loss(model_output.float(), target.float())
