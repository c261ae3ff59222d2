"""A model's own default sampler (ModelConfig.default_sampler): what a request that names none runs with."""

from __future__ import annotations

import dataclasses

import pytest

from models.config import ModelConfig, builtin_config, from_dict, to_dict
from models.names import DEFAULT_SAMPLER, default_sampler
from service import schemas


def test_a_models_own_default_replaces_dpmpp_2m_unless_karras_sigmas_are_asked() -> None:
    assert default_sampler() == DEFAULT_SAMPLER == "dpmpp_2m"
    assert default_sampler("euler_a") == "euler_a"
    assert default_sampler("euler_a", karras=True) == "dpmpp_2m"  # the one sampler with Karras sigmas
    assert schemas.DEFAULT_SAMPLER == DEFAULT_SAMPLER  # the front ends' torch-free copy


def test_the_config_keeps_it_through_a_file_and_older_files_have_none() -> None:
    config = dataclasses.replace(builtin_config("sd-v1"), default_sampler="ddim")
    assert from_dict(ModelConfig, to_dict(config)).default_sampler == "ddim"
    older = to_dict(builtin_config("sd-v1"))
    older.pop("default_sampler")
    assert from_dict(ModelConfig, older).default_sampler is None


def test_an_unknown_sampler_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="default_sampler"):
        dataclasses.replace(builtin_config("sd-v1"), default_sampler="heun")  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="heun"):
        from_dict(ModelConfig, {**to_dict(builtin_config("sd-v1")), "default_sampler": "heun"})


def test_training_writes_it_into_the_models_config() -> None:
    from models.train.ldm_trainer import LDMTrainConfig

    autoencoder = dataclasses.replace(builtin_config("sd-v1").autoencoder, embed_dim=3)
    assert LDMTrainConfig(default_sampler="euler_a").model_config(autoencoder, 0.5).default_sampler == "euler_a"
    assert LDMTrainConfig().model_config(autoencoder, 0.5).default_sampler is None


def test_a_request_that_names_none_leaves_it_to_its_model() -> None:
    """Unset until submission fills in the model's; a request queued without one (past the front ends) batches as
    DEFAULT_SAMPLER until the worker, which knows its model, fills in its own (runner.batch_key)."""
    request = schemas.GenerationRequest(model="m", seed=1)
    assert request.sampler is None and request.effective_sampler == "dpmpp_2m"
    assert request.batch_key().sampler == "dpmpp_2m"
    assert schemas.GenerationRequest(model="m", seed=1, sampler="plms").batch_key().sampler == "plms"


def test_eta_without_a_sampler_names_the_one_it_needs_and_karras_alone_is_accepted() -> None:
    settings = schemas.Settings()
    with pytest.raises(schemas.ValidationError, match=r"eta applies to ddim only, not no sampler \(name ddim\)"):
        schemas.admit(schemas.GenerationRequest(eta=0.5), settings)
    assert schemas.admit(schemas.GenerationRequest(karras=True), settings).karras


@pytest.mark.parametrize("argv", [["generate", "a red circle"], ["grid"], ["eval"]])
def test_the_commands_sampler_flag_defaults_to_the_models(argv: list[str]) -> None:
    """None on the command line: `ldm generate`, `ldm grid` and `ldm eval` then take the model's (the shipped
    files' in tests/e2e/test_shipped_conditionings.py)."""
    from service.cli import build_parser

    assert build_parser().parse_args(argv).sampler is None
    assert build_parser().parse_args([*argv, "--sampler", "plms"]).sampler == "plms"


def test_a_samplers_own_scale_replaces_the_models_for_that_sampler_only() -> None:
    """sampler_guidance: PLMS at 2 on a model whose default is 5 (shapes-class); the other samplers keep 5, and
    unguided tasks stay at 1 whatever the sampler."""
    from models.config import SamplerGuidance

    config = dataclasses.replace(builtin_config("sd-v1"), default_guidance=5.0,
                                 sampler_guidance=(SamplerGuidance("plms", 2.0),))
    assert config.guidance_for("txt2img", "plms") == 2.0
    assert config.guidance_for("txt2img", "euler_a") == config.guidance_for("img2img", "ddim") == 5.0
    assert dataclasses.replace(config, default_guidance=None).guidance_for("txt2img", "dpmpp_2m") == 7.5
    assert from_dict(ModelConfig, to_dict(config)).sampler_guidance == (SamplerGuidance("plms", 2.0),)


@pytest.mark.parametrize("entries", [(("plms", 0.5),), (("plms", 2.0), ("plms", 3.0)), (("heun", 2.0),)])
def test_a_bad_sampler_guidance_is_refused_by_name(entries: tuple[tuple[str, float], ...]) -> None:
    from models.config import SamplerGuidance

    with pytest.raises(ValueError, match="sampler_guidance"):
        dataclasses.replace(builtin_config("sd-v1"),
                            sampler_guidance=tuple(SamplerGuidance(s, g) for s, g in entries))  # type: ignore[arg-type]
