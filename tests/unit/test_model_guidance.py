"""A model's own default guidance scale (ModelConfig.default_guidance): what a request that gives none runs at."""

from __future__ import annotations

import dataclasses

import pytest

from models.config import ModelConfig, builtin_config, from_dict, to_dict
from models.names import DEFAULT_GUIDANCE, default_guidance


def test_a_models_own_default_replaces_the_tasks_for_its_guided_tasks_only() -> None:
    assert default_guidance("txt2img", "text") == DEFAULT_GUIDANCE["txt2img"] == 7.5
    assert default_guidance("txt2img", "text", 2.5) == 2.5
    assert default_guidance("img2img", "text", 2.5) == 2.5
    assert default_guidance("unconditional", "text", 2.5) == 1.0  # unguided whatever the model says
    assert default_guidance("class", "class_only", 4.0) == 1.0  # no null class: guidance is impossible


def test_the_config_keeps_it_through_a_file_and_older_files_have_none() -> None:
    config = dataclasses.replace(builtin_config("sd-v1"), default_guidance=3.0)
    assert from_dict(ModelConfig, to_dict(config)).default_guidance == 3.0
    older = to_dict(builtin_config("sd-v1"))
    older.pop("default_guidance")
    assert from_dict(ModelConfig, older).default_guidance is None


@pytest.mark.parametrize("scale", [0.5, 0.0, 101.0])
def test_an_out_of_range_default_is_refused_by_name(scale: float) -> None:
    with pytest.raises(ValueError, match="default_guidance"):
        dataclasses.replace(builtin_config("sd-v1"), default_guidance=scale)


def test_training_writes_it_into_the_models_config() -> None:
    from models.train.ldm_trainer import LDMTrainConfig

    autoencoder = dataclasses.replace(builtin_config("sd-v1").autoencoder, embed_dim=3)
    assert LDMTrainConfig(default_guidance=2.5).model_config(autoencoder, 0.5).default_guidance == 2.5
    assert LDMTrainConfig().model_config(autoencoder, 0.5).default_guidance is None
