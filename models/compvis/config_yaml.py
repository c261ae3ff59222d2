"""A CompVis latent-diffusion `config.yaml` -> our `ModelConfig`, through a fixed table of `target:` names.

The zoo's configs name Python classes (`target: ldm.models.diffusion.ddpm.LatentDiffusion`) for
`instantiate_from_config` to import. We import nothing by name: each target we understand maps to a function
that reads its `params` into our dataclasses, an unknown target is an error naming it, and so is an unknown
parameter of a known target (it could change the math). Entries that only matter for training (`lossconfig`,
`data`, `scheduler_config`, `monitor`, learning rates, ...) are skipped, as the brief of each table says.

What the tensors do not say and the config does (ldm-facts §3, compvis-zoo-contract "Loading"):
- heads: the original's legacy rule (`num_head_channels` != -1: heads = ch // num_head_channels; else
  `num_heads`), which `UNetConfig.heads` implements with `legacy=True`;
- the schedule: CompVis "linear" is linear in sqrt(beta) (our `scaled_linear`), `linear_start/end`, `timesteps`;
- the conditioning key: `conditioning_key`, else `concat_mode` (default True!), and none at all for
  `cond_stage_config: __is_unconditional__`;
- the scale factor: `scale_factor` (default 1.0), or with `scale_by_std: true` the checkpoint's buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from models.autoencoder import AutoencoderConfig
from models.compvis.bert import BERTEmbedderConfig
from models.compvis.boxes import BoxTokensConfig
from models.compvis.rescaler import SpatialRescalerConfig
from models.conditioners import ConditionerConfig
from models.config import ConcatInput, Conditioning, Family, ModelConfig
from models.diffusion import BetaSchedule, ScheduleConfig
from models.unet import UNetConfig

LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel")
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"
BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
RESCALER_TARGET = "ldm.modules.encoders.modules.SpatialRescaler"
IDENTITY_TARGET = "torch.nn.Identity"
UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE = "__is_first_stage__"

#: LatentDiffusion / DDPM parameters that shape training or logging only
_LDM_TRAINING = frozenset({
    "base_learning_rate", "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "channels",
    "cond_stage_trainable", "monitor", "use_ema", "loss_type", "scheduler_config", "clip_denoised",
    "original_elbo_weight", "l_simple_weight", "learn_logvar", "logvar_init", "v_posterior", "ckpt_path",
    "ignore_keys", "load_only_unet", "cond_stage_forward", "use_positional_encodings", "image_size",
})
#: UNetModel parameters that do not change the math of a forward pass in eval mode
_UNET_IGNORED = frozenset({"image_size", "use_checkpoint", "use_fp16"})
#: first-stage parameters for training only
_AE_IGNORED = frozenset({"lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key", "sane_index_shape",
                         "batch_resize_range", "scheduler_config", "lr_g_factor", "use_ema"})


class CompVisConfigError(ValueError):
    """A config.yaml we cannot map faithfully; the message names the target and the entry."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML, read safely (no Python tags), as plain data."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        raise CompVisConfigError(f"{path}: not a readable YAML file ({err})") from None
    if not isinstance(data, dict):
        raise CompVisConfigError(f"{path}: expected a mapping at the top level")
    return data


def is_compvis_config(data: Mapping[str, Any]) -> bool:
    """A latent-diffusion style config: `model: {target: ..., params: ...}`."""
    model = data.get("model")
    return isinstance(model, dict) and "target" in model


class _Params:
    """The `params` of one target, consumed key by key, so the leftovers are the unknown ones."""

    def __init__(self, target: str, params: Any, where: str) -> None:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise CompVisConfigError(f"{where} ({target}): params must be a mapping")
        self.target, self.where, self.left = target, where, dict(params)

    def get(self, key: str, default: Any = None) -> Any:
        return self.left.pop(key, default)

    def require(self, key: str) -> Any:
        if key not in self.left:
            raise CompVisConfigError(f"{self.where} ({self.target}): missing {key!r}")
        return self.left.pop(key)

    def expect(self, key: str, value: Any, why: str) -> None:
        """A parameter we support only at one value (the original's default)."""
        got = self.left.pop(key, value)
        if got != value:
            raise CompVisConfigError(f"{self.where} ({self.target}): {key}={got!r} is not supported ({why})")

    def done(self, ignored: frozenset[str] = frozenset()) -> None:
        unknown = sorted(k for k in self.left if k not in ignored)
        if unknown:
            raise CompVisConfigError(f"{self.where} ({self.target}): unknown parameter(s) {unknown}; refusing to "
                                     "guess what they change")


def _node(value: Any, where: str) -> tuple[str, Any]:
    if not isinstance(value, dict) or "target" not in value:
        raise CompVisConfigError(f"{where}: expected a mapping with a 'target'")
    return str(value["target"]), value.get("params")


# --------------------------------------------------------------------------------------------- parts


def unet_config(node: Any) -> UNetConfig:
    target, raw = _node(node, "unet_config")
    if target != UNET_TARGET:
        raise CompVisConfigError(f"unet_config: unknown target {target!r} (known: {UNET_TARGET})")
    p = _Params(target, raw, "unet_config")
    num_heads, head_channels = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    upsample_heads = p.get("num_heads_upsample", -1)
    if upsample_heads not in (-1, num_heads):
        raise CompVisConfigError(f"unet_config: num_heads_upsample={upsample_heads} (differing from num_heads) "
                                 "is not supported")
    p.expect("dims", 2, "only 2-D UNets")
    p.expect("conv_resample", True, "only convolutional resampling")
    p.expect("use_new_attention_order", False, "only the legacy QKV order")
    p.expect("n_embed", None, "codebook-index prediction")
    context = p.get("context_dim")
    config = UNetConfig(
        in_channels=int(p.require("in_channels")), out_channels=int(p.require("out_channels")),
        model_channels=int(p.require("model_channels")), channel_mult=tuple(p.get("channel_mult", (1, 2, 4, 8))),
        num_res_blocks=int(p.require("num_res_blocks")),
        attention_resolutions=tuple(p.require("attention_resolutions")),
        num_heads=num_heads, num_head_channels=head_channels,
        transformer_depth=int(p.get("transformer_depth", 1)),
        context_dim=None if context is None else int(context),
        use_spatial_transformer=bool(p.get("use_spatial_transformer", False)),
        num_classes=p.get("num_classes"),
        use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
        resblock_updown=bool(p.get("resblock_updown", False)),
        dropout=float(p.get("dropout", 0.0)),
        legacy=bool(p.get("legacy", True)),
    )
    p.done(_UNET_IGNORED)
    return config


def first_stage_config(node: Any) -> AutoencoderConfig:
    target, raw = _node(node, "first_stage_config")
    if target not in (*VQ_TARGETS, KL_TARGET):
        raise CompVisConfigError(f"first_stage_config: unknown target {target!r} (known: {[*VQ_TARGETS, KL_TARGET]})")
    p = _Params(target, raw, "first_stage_config")
    kl = target == KL_TARGET
    p.expect("remap", None, "codebook remapping")
    p.expect("colorize_nlabels", None, "segmentation first stages")
    embed_dim, n_embed = int(p.require("embed_dim")), 0 if kl else int(p.require("n_embed"))
    d = _Params(target, p.require("ddconfig"), "first_stage_config.ddconfig")
    p.done(_AE_IGNORED)
    d.expect("double_z", kl, "KL first stages have double_z true, VQ ones false")
    d.expect("tanh_out", False, "a tanh on the decoder output")
    d.expect("give_pre_end", False, "a decoder that stops early")
    d.expect("resamp_with_conv", True, "resampling without convolutions")
    attn_type = d.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "none"):
        raise CompVisConfigError(f"first_stage_config.ddconfig: attn_type {attn_type!r} is not supported "
                                 "(vanilla or none)")
    config = AutoencoderConfig(
        kind="kl" if kl else "vq", in_channels=int(d.require("in_channels")), out_channels=int(d.require("out_ch")),
        ch=int(d.require("ch")), ch_mult=tuple(d.require("ch_mult")), num_res_blocks=int(d.require("num_res_blocks")),
        attn_resolutions=tuple(d.require("attn_resolutions")), resolution=int(d.require("resolution")),
        z_channels=int(d.require("z_channels")), embed_dim=embed_dim, n_embed=n_embed,
        mid_attention=attn_type != "none", dropout=float(d.get("dropout", 0.0)),
    )
    d.done()
    return config


def schedule_config(p: _Params) -> ScheduleConfig:
    """DDPM's `register_schedule` arguments; CompVis names mapped to diffusers' (see ScheduleConfig)."""
    names: dict[str, BetaSchedule] = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
    kind = p.get("beta_schedule", "linear")
    if kind not in names:
        raise CompVisConfigError(f"model.params: beta_schedule {kind!r} is not supported ({sorted(names)})")
    p.expect("cosine_s", 8e-3, "only the standard cosine offset")
    p.expect("given_betas", None, "explicit betas")
    p.expect("parameterization", "eps", "only epsilon prediction")
    return ScheduleConfig(beta_schedule=names[kind], beta_start=float(p.get("linear_start", 1e-4)),
                          beta_end=float(p.get("linear_end", 2e-2)), num_train_timesteps=int(p.get("timesteps", 1000)),
                          prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")


def _conditioner(node: Any) -> tuple[ConditionerConfig | None, ConcatInput | None]:
    """cond_stage_config -> (our conditioner, the concat input it implies, if any)."""
    if node == UNCONDITIONAL:
        return None, None
    if node == FIRST_STAGE:
        return None, "masked_image"
    target, raw = _node(node, "cond_stage_config")
    p = _Params(target, raw, "cond_stage_config")
    if target == IDENTITY_TARGET:
        p.done()
        return None, "lowres"
    if target == CLASS_TARGET:
        dim = int(p.require("embed_dim"))
        if "n_classes" not in p.left:  # cin256: the default 1000 rows, every one a class, no null class
            p.done(frozenset({"key"}))
            return ConditionerConfig(kind="class", n_classes=1000, class_dim=dim, class_null=False), None
        rows = int(p.require("n_classes"))
        p.done(frozenset({"key"}))
        if rows < 2:
            raise CompVisConfigError(f"cond_stage_config ({target}): n_classes={rows} leaves no class")
        # the last row is the null class of classifier-free guidance (cin256-v2: 1001 rows, null = 1000)
        return ConditionerConfig(kind="class", n_classes=rows - 1, class_dim=dim), None
    if target == BERT_TARGET:
        use_tokenizer = bool(p.get("use_tokenizer", True))
        bert = BERTEmbedderConfig(width=int(p.require("n_embed")), depth=int(p.require("n_layer")),
                                  vocab_size=int(p.get("vocab_size", 30522)),
                                  max_length=int(p.get("max_seq_len", 77)))
        p.expect("embedding_dropout", 0.0, "dropout is training-only, but a nonzero value is unexpected here")
        p.done(frozenset({"device"}))
        if not use_tokenizer:  # layout2img-openimages256: taming's box tokens (models/compvis/boxes.py)
            try:
                boxes = BoxTokensConfig.for_sequence(bert.max_length, bert.vocab_size)
            except ValueError as err:
                raise CompVisConfigError(f"cond_stage_config ({target}, use_tokenizer false): {err}") from None
            return ConditionerConfig(kind="box_tokens", bert=bert, boxes=boxes, n_classes=boxes.n_classes), None
        return ConditionerConfig(kind="bert", bert=bert), None
    if target == RESCALER_TARGET:
        rescaler = SpatialRescalerConfig(n_stages=int(p.get("n_stages", 1)), method=str(p.get("method", "bilinear")),
                                         multiplier=float(p.get("multiplier", 0.5)),
                                         in_channels=int(p.get("in_channels", 3)),
                                         out_channels=p.get("out_channels"), bias=bool(p.get("bias", False)))
        p.done()
        # n_classes: the largest label (maps hold 0..n_classes, the convention of semantic maps here)
        return ConditionerConfig(kind="rescaler", n_classes=rescaler.in_channels - 1, rescaler=rescaler), "rescaled_map"
    known = [IDENTITY_TARGET, CLASS_TARGET, BERT_TARGET, RESCALER_TARGET, UNCONDITIONAL, FIRST_STAGE]
    raise CompVisConfigError(f"cond_stage_config: unknown target {target!r} (known: {known})")


def _wiring(key: str | None, concat: ConcatInput | None, conditioner: ConditionerConfig | None,
            where: str) -> tuple[Conditioning, ConcatInput]:
    if key is None:
        return "none", "none"
    if key == "crossattn":
        if conditioner is None or concat is not None:
            raise CompVisConfigError(f"{where}: conditioning_key crossattn with this cond_stage_config (no context "
                                     "encoder of ours, e.g. the retrieval models' precomputed neighbours) is not "
                                     "supported; it works with ClassEmbedder or BERTEmbedder")
        return "crossattn", "none"
    if key == "concat":
        if concat is None:
            raise CompVisConfigError(f"{where}: conditioning_key concat with this cond_stage_config is not supported")
        return "concat", concat
    raise CompVisConfigError(f"{where}: conditioning_key {key!r} is not supported (crossattn, concat, or none)")


def model_config(data: Mapping[str, Any], name: str, scale_factor_buffer: float | None = None) -> ModelConfig:
    """The whole model. `scale_factor_buffer`: the checkpoint's `scale_factor` tensor, needed with
    `scale_by_std: true` (the factor is computed on the first training batch and stored there)."""
    target, raw = _node(data.get("model"), "model")
    if target != LDM_TARGET:
        raise CompVisConfigError(f"model: unknown target {target!r} (known: {LDM_TARGET}; first stages alone load "
                                 "with `ldm reconstruct`)")
    p = _Params(target, raw, "model.params")
    unet = unet_config(p.require("unet_config"))
    autoencoder = first_stage_config(p.require("first_stage_config"))
    schedule = schedule_config(p)
    cond_node = p.require("cond_stage_config")
    conditioner, concat = _conditioner(cond_node)
    key = p.get("conditioning_key")
    concat_mode = bool(p.get("concat_mode", True))
    if key is None:  # ddpm.py LatentDiffusion.__init__: backwards compatibility before DiffusionWrapper
        key = "concat" if concat_mode else "crossattn"
    if cond_node == UNCONDITIONAL:
        key = None
    conditioning, concat_input = _wiring(key, concat, conditioner, "model.params")
    image_size = p.left.get("image_size")
    if p.get("scale_by_std", False):
        if scale_factor_buffer is None:
            raise CompVisConfigError("model.params: scale_by_std is true, but the checkpoint has no scale_factor "
                                     "buffer")
        scale = float(scale_factor_buffer)
    else:
        scale = float(p.get("scale_factor", 1.0))
    p.done(_LDM_TRAINING)
    family: Family = "ldm_sr" if concat_input == "lowres" else "ldm"
    f = autoencoder.downsample_factor
    default = int(image_size) * f if image_size is not None else 256
    context = conditioner.context_dim if conditioner is not None else None
    if context is not None and unet.context_dim != context:
        raise CompVisConfigError(f"model.params: unet context_dim {unet.context_dim} differs from the conditioner's "
                                 f"width {context}")
    try:
        return ModelConfig(name=name, family=family, unet=unet, autoencoder=autoencoder, schedule=schedule,
                           conditioner=conditioner, conditioning=conditioning, concat_input=concat_input,
                           scale_factor=scale, default_size=default,
                           description=f"CompVis latent-diffusion zoo model ({name})")
    except ValueError as err:
        raise CompVisConfigError(f"model.params: {err}") from None


def load_config(path: Path, name: str, scale_factor_buffer: float | None = None) -> ModelConfig:
    """`model_config` of a config.yaml file, errors prefixed with its path."""
    try:
        return model_config(read_yaml(path), name, scale_factor_buffer)
    except CompVisConfigError as err:
        raise CompVisConfigError(f"{path}: {err}") from None

