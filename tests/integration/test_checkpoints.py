"""Checkpoint files in, models out: the layouts that load, the files that must not, and what the errors say.

Every file here is a real file on disk written in tmp_path: original single-file checkpoints of toy
SD-v1-structured models (random weights, no config of ours, so family and architecture are inferred
from keys and shapes), `.ckpt` pickles, files saved by `save_model`, and diffusers folders written by
diffusers itself. Bad files must give a `CheckpointError` whose message names the file's problem.
"""

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.checkpoints import CONFIG_METADATA_KEY, CheckpointError, load_model, save_model
from models.conditioners import ConditionerConfig
from models.config import ModelConfig
from models.ldm import LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.text.clip import MissingTokenizerError
from models.tokenizers import CLIPTokenizer
from models.unet import UNetConfig
from tests.helpers import (
    original_checkpoint,
    random_model,
    save_diffusers_folder,
    toy_sd_config,
    toy_sr_config,
    write_clip_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = "model.diffusion_model."
SPEC = SampleSpec("a red cat on a windowsill", "blurry", seed=3, guidance_scale=5.0)
SETTINGS = RunSettings(sampler="dpmpp_2m", steps=3, width=32, height=32)


@dataclass(frozen=True)
class Toy:
    """A random toy SD v1 model, its original-layout state dict, and that state dict as a .safetensors file."""

    config: ModelConfig
    model: LatentDiffusion
    checkpoint: dict[str, torch.Tensor]
    path: Path
    tokenizer_dir: Path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir: Path) -> int:
    return CLIPTokenizer.from_dir(tokenizer_dir).vocab_size


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, vocab_size: int) -> Toy:
    config = toy_sd_config(vocab_size)
    model = random_model(config, seed=0, tokenizer_dir=tokenizer_dir)
    checkpoint = original_checkpoint(model)
    path = tmp_path_factory.mktemp("toy") / "toy-sd.safetensors"
    save_file(checkpoint, str(path))
    return Toy(config, model, checkpoint, path, tokenizer_dir)


def write(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def assert_same_weights(a: LatentDiffusion, b: LatentDiffusion) -> None:
    sa, sb = a.original_state_dict(), b.original_state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def txt2img(model: LatentDiffusion) -> np.ndarray:
    """Pixels of one generation; on a copy, because Pipeline prepacks the model it runs for inference."""
    return np.asarray(Pipeline(copy.deepcopy(model)).txt2img([SPEC], SETTINGS).images[0])


# ------------------------------------------------------------------------------------------ bad files


def test_truncated_safetensors_is_a_clear_error(toy: Toy, tmp_path: Path) -> None:
    data = toy.path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file, truncated"):
        load_model(cut)


def test_truncated_ckpt_is_a_clear_error(toy: Toy, tmp_path: Path) -> None:
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": toy.checkpoint}, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_model(cut)


#: what unpickling TrainerState would have done: proof that no pickled code ran
UNPICKLED: list[str] = []


class TrainerState:
    """Stands in for the Python objects training checkpoints pickle besides tensors (Lightning callbacks)."""

    def __init__(self) -> None:
        self.epoch = 3

    def __setstate__(self, state: dict[str, int]) -> None:
        UNPICKLED.append("TrainerState.__setstate__ ran")
        self.__dict__.update(state)


def test_ckpt_with_a_pickled_object_is_refused_without_running_it(toy: Toy, tmp_path: Path) -> None:
    path = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": toy.checkpoint, "callbacks": TrainerState()}, path)
    with pytest.raises(CheckpointError, match=r"trainer\.ckpt: refused: .*weights_only=True") as err:
        load_model(path)
    assert "TrainerState" in str(err.value)
    assert UNPICKLED == []


@pytest.mark.parametrize("kind", ["autoencoder_alone", "unrelated_tensors", "six_channel_unet"])
def test_wrong_family_is_a_clear_error(toy: Toy, tmp_path: Path, kind: str) -> None:
    sd = dict(toy.checkpoint)
    if kind == "autoencoder_alone":
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
        expected = r"not a latent diffusion checkpoint: no model\.diffusion_model\.\* keys .*autoencoder alone"
    elif kind == "unrelated_tensors":
        sd = {"fc.weight": torch.zeros(2, 2)}
        expected = r"not a latent diffusion checkpoint"
    else:  # CLIP-conditioned, but a UNet input that is neither txt2img (4) nor inpainting (9)
        key = UNET + "input_blocks.0.0.weight"
        sd[key] = torch.zeros(32, 6, 3, 3)
        expected = r"SD v1 text encoder with a 6-channel UNet input: expected 4 \(txt2img\) or 9 \(inpainting\)"
    with pytest.raises(CheckpointError, match=expected):
        load_model(write(sd, tmp_path / f"{kind}.safetensors"))


def test_sd2_like_checkpoint_is_named_as_such(tmp_path: Path, vocab_size: int) -> None:
    """A 1024-wide text context is Stable Diffusion 2.x; with SD 1's CLIP key names instead of OpenCLIP's,
    its text encoder's activation and output layer are unknown, so it is refused by name."""
    model = random_model(toy_sd_config(vocab_size, clip_width=1024), seed=1)
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2\.x checkpoint \(1024-wide context\) with SD 1's"):
        load_model(write(original_checkpoint(model), tmp_path / "sd2.safetensors"))


def test_misshaped_tensor_names_the_key_and_both_shapes(toy: Toy, tmp_path: Path) -> None:
    key = UNET + "middle_block.0.in_layers.2.weight"  # [64, 64, 3, 3]
    sd = dict(toy.checkpoint)
    sd[key] = sd[key].reshape(64, -1)
    with pytest.raises(CheckpointError) as err:
        load_model(write(sd, tmp_path / "misshaped.safetensors"))
    assert f"misshaped unet keys (file vs model): {key} (64, 576) vs (64, 64, 3, 3)" in str(err.value)


def test_misshaped_tensor_in_a_file_with_its_config_is_named_too(toy: Toy, tmp_path: Path) -> None:
    """With our config in the metadata nothing is inferred, so even a tensor inference reads is checked."""
    saved = save_model(toy.model, tmp_path / "saved.safetensors")
    with safe_open(str(saved), framework="pt") as fh:
        metadata = dict(fh.metadata())
    sd = load_file(str(saved))
    key = UNET + "time_embed.0.weight"  # [128, 32]
    sd[key] = sd[key].T
    with pytest.raises(CheckpointError) as err:
        load_model(write(sd, tmp_path / "transposed.safetensors", metadata), tokenizer_dir=toy.tokenizer_dir)
    assert f"{key} (32, 128) vs (128, 32)" in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "first_stage_model.decoder.conv_out.bias",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2.weight",
        UNET + "input_blocks.1.0.out_layers.3.weight",  # a key the architecture is inferred from
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ],
)
def test_missing_key_is_named(toy: Toy, tmp_path: Path, key: str) -> None:
    sd = {k: v for k, v in toy.checkpoint.items() if k != key}
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(write(sd, tmp_path / "missing.safetensors"))
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (UNET + "input_blocks.1.0.extra.weight", "unexpected unet keys: "),
        ("first_stage_model.loss.discriminator.weight2", "unexpected autoencoder keys: "),
        ("some_other_model.weight", "unexpected keys outside the model's parts: "),
    ],
)
def test_unexpected_key_is_named(toy: Toy, tmp_path: Path, key: str, expected: str) -> None:
    sd = {**toy.checkpoint, key: torch.zeros(3)}
    with pytest.raises(CheckpointError) as err:
        load_model(write(sd, tmp_path / "unexpected.safetensors"))
    assert expected + key in str(err.value)


@pytest.mark.parametrize(("metadata", "expected"), [
    ("{not json", "Expecting property name"),
    (json.dumps({"name": "x", "bogus": 1}), r"ldm_serve_config: unknown key\(s\) \['bogus'\]"),
])
def test_invalid_config_metadata_is_a_clear_error(toy: Toy, tmp_path: Path, metadata: str, expected: str) -> None:
    path = write(toy.checkpoint, tmp_path / "meta.safetensors", {CONFIG_METADATA_KEY: metadata})
    with pytest.raises(CheckpointError, match=r"meta\.safetensors: the model config in its metadata is invalid: "
                                              + expected):
        load_model(path)


def test_missing_file_and_unknown_shipped_name(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or folder"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=r"no-such-model: no such file or folder, and not a shipped model "
                                              r"\(shipped: \[.*\]\)"):
        load_model("no-such-model")


# ------------------------------------------------------------------------------------------ layouts that load


def test_single_file_gives_the_inferred_config_and_the_weights(toy: Toy) -> None:
    loaded = load_model(toy.path, tokenizer_dir=toy.tokenizer_dir)
    assert loaded.config == dataclasses.replace(toy.config, name="toy-sd")
    assert_same_weights(loaded, toy.model)
    np.testing.assert_array_equal(txt2img(loaded), txt2img(toy.model))


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict", "bare"])
def test_ckpt_loads_like_the_safetensors(toy: Toy, tmp_path: Path, wrapped: bool) -> None:
    """An original .ckpt ({"state_dict": ..., "epoch": ..., "global_step": ...}, plain tensors and numbers)."""
    path = tmp_path / "toy-sd.ckpt"
    torch.save({"state_dict": toy.checkpoint, "epoch": 6, "global_step": 470000} if wrapped else toy.checkpoint,
               path)
    from_ckpt = load_model(path, tokenizer_dir=toy.tokenizer_dir)
    from_safetensors = load_model(toy.path, tokenizer_dir=toy.tokenizer_dir)
    assert from_ckpt.config == from_safetensors.config
    assert_same_weights(from_ckpt, from_safetensors)
    np.testing.assert_array_equal(txt2img(from_ckpt), txt2img(from_safetensors))


def test_save_model_round_trip_keeps_config_weights_and_pixels(tmp_path: Path, tokenizer_dir: Path,
                                                                vocab_size: int) -> None:
    """A config that shape inference could not recover (head counts, size, name) comes back from the metadata."""
    base = toy_sd_config(vocab_size)
    assert base.conditioner is not None
    config = dataclasses.replace(
        base, name="my-model", description="trained on cats", default_size=32,
        unet=dataclasses.replace(base.unet, num_heads=2),
        conditioner=dataclasses.replace(base.conditioner, clip=dataclasses.replace(base.conditioner.clip,
                                                                                   num_heads=2)),
    )
    model = random_model(config, seed=5, tokenizer_dir=tokenizer_dir)
    path = save_model(model, tmp_path / "sub" / "mine.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()[CONFIG_METADATA_KEY])["name"] == "my-model"
    loaded = load_model(path, tokenizer_dir=tokenizer_dir)
    assert loaded.config == config
    assert_same_weights(loaded, model)
    np.testing.assert_array_equal(txt2img(loaded), txt2img(model))


def test_ema_weights(toy: Toy, tmp_path: Path) -> None:
    """LitEma's shadow copy (`model_ema.diffusion_model<key without dots>`, plus decay/num_updates)."""
    ema_model = random_model(toy.config, seed=9)
    sd = dict(toy.checkpoint)
    for key, tensor in ema_model.unet.state_dict().items():
        sd["model_ema.diffusion_model" + key.replace(".", "")] = tensor
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    path = write(sd, tmp_path / "with-ema.safetensors")

    ema = load_model(path, use_ema=True)
    plain = load_model(path)
    for key, tensor in ema.unet.state_dict().items():
        assert torch.equal(tensor, ema_model.unet.state_dict()[key]), key
        assert torch.equal(plain.unet.state_dict()[key], toy.model.unet.state_dict()[key]), key
    assert not torch.equal(ema.unet.state_dict()["out.2.weight"], plain.unet.state_dict()["out.2.weight"])
    for part in ("autoencoder", "conditioner"):  # EMA covers the UNet only
        for key, tensor in getattr(ema, part).state_dict().items():
            assert torch.equal(tensor, getattr(plain, part).state_dict()[key]), key

    with pytest.raises(CheckpointError, match=r"toy-sd\.safetensors: asked for EMA weights, but the file has none"):
        load_model(toy.path, use_ema=True)
    partial = {k: v for k, v in sd.items() if k != "model_ema.diffusion_modelout2bias"}
    with pytest.raises(CheckpointError, match=r"but these are missing: model_ema\.diffusion_modelout2bias"):
        load_model(write(partial, tmp_path / "partial-ema.safetensors"), use_ema=True)


@pytest.mark.parametrize(
    "unet",
    [
        # not SD's width: 64 channels, 3 levels (1, 2, 2), one ResBlock a level, attention at ds 2 and 1
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                   context_dim=64),
        # two ResBlocks a level, attention at the lowest level only, 2 transformer layers with linear projections
        UNetConfig(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2, attention_resolutions=(4,),
                   transformer_depth=2, use_linear_in_transformer=True, context_dim=64),
    ],
    ids=["width64-mult122-1block", "depth2-linear-2blocks"],
)
def test_architecture_inferred_from_shapes(tmp_path: Path, vocab_size: int, unet: UNetConfig) -> None:
    base = toy_sd_config(vocab_size)
    config = dataclasses.replace(base, unet=unet)
    path = write(original_checkpoint(random_model(config, seed=2)), tmp_path / "variant.safetensors")
    assert load_model(path).config == dataclasses.replace(config, name="variant")


def test_ldm_sr_family_inferred(tmp_path: Path) -> None:
    """LDM 4x SR: no text encoder, a VQ f=4 autoencoder, UNet input = 3-channel latent + low-res RGB."""
    config = toy_sr_config()
    model = random_model(config, seed=4)
    path = write(original_checkpoint(model), tmp_path / "sr.safetensors")
    loaded = load_model(path)
    assert loaded.config.family == "ldm_sr"
    assert loaded.config.autoencoder.kind == "vq" and loaded.config.downsample_factor == 4
    assert loaded.config == dataclasses.replace(config, name="sr", description="")
    assert_same_weights(loaded, model)


def test_class_conditional_ldm_family_inferred(tmp_path: Path) -> None:
    """The paper's class-conditional LDMs (cin256-v2): ClassEmbedder `cond_stage_model.embedding.weight`
    [classes + 1, 512], cross-attention UNet over that 1-token context, a VQ f=4 autoencoder."""
    base = toy_sr_config()
    config = dataclasses.replace(
        base, name="cin", family="ldm", conditioning="crossattn", concat_input="none",
        unet=dataclasses.replace(base.unet, in_channels=3, out_channels=3, use_spatial_transformer=True,
                                 num_heads=1, num_head_channels=-1, context_dim=64),
        conditioner=ConditionerConfig(kind="class", n_classes=10, class_dim=64),
        description="class-conditional LDM (prompt = class id)")
    model = random_model(config, seed=6)
    loaded = load_model(write(original_checkpoint(model), tmp_path / "cin.safetensors"))
    assert loaded.config.family == "ldm" and loaded.config.conditioner == config.conditioner
    assert loaded.config.unet.context_dim == 64
    assert_same_weights(loaded, model)
    specs = [SampleSpec("3", "", seed=1, guidance_scale=3.0), SampleSpec("7", "", seed=1, guidance_scale=3.0)]
    a, b = Pipeline(loaded).txt2img(specs, RunSettings(steps=2, width=16, height=16)).images
    assert np.asarray(a).tolist() != np.asarray(b).tolist()  # the class id steers the image


def test_single_file_without_tokenizer_loads_but_cannot_generate(toy: Toy) -> None:
    model = load_model(toy.path)
    assert_same_weights(model, toy.model)
    with pytest.raises(MissingTokenizerError, match=r"no tokenizer: give a tokenizer folder \(`--tokenizer DIR`\)"):
        Pipeline(model).txt2img([SPEC], SETTINGS)


def test_loads_in_half_precision(toy: Toy) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        model = load_model(toy.path, tokenizer_dir=toy.tokenizer_dir, dtype=dtype)
        assert {t.dtype for t in model.state_dict().values()} == {dtype}
        ours, original = model.unet.state_dict()["out.2.weight"], toy.model.unet.state_dict()["out.2.weight"]
        assert torch.equal(ours, original.to(dtype))


# ------------------------------------------------------------------------------------------ diffusers folders


@pytest.fixture(scope="module")
def sd_folder(toy: Toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_diffusers_folder(toy.checkpoint, toy.config, toy.tokenizer_dir, tmp_path_factory.mktemp("sd-folder"))


def test_diffusers_folder_equals_the_single_file(toy: Toy, sd_folder: Path) -> None:
    """The folder diffusers wrote from the same weights: same config, same tensors, same pixels."""
    from_folder = load_model(sd_folder)  # its own tokenizer/ folder
    from_file = load_model(toy.path, tokenizer_dir=toy.tokenizer_dir)
    assert from_folder.config == dataclasses.replace(from_file.config, name=sd_folder.name)
    assert_same_weights(from_folder, from_file)
    np.testing.assert_array_equal(txt2img(from_folder), txt2img(from_file))


def test_diffusers_folder_refuses_ema_and_component_files(sd_folder: Path) -> None:
    with pytest.raises(CheckpointError, match="a diffusers folder holds one set of UNet weights, no EMA copy"):
        load_model(sd_folder, use_ema=True)
    with pytest.raises(CheckpointError, match="looks like one diffusers component file: pass the whole diffusers"):
        load_model(sd_folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_folder_saved_in_shards_equals_the_whole_one(toy: Toy, sd_folder: Path, tmp_path: Path) -> None:
    """diffusers and transformers split weights over their size limit into shards and an `.index.json`; the
    shards are read as one file (the real SDXL UNet, 10.3 GB in fp32, is over diffusers' 10 GB)."""
    import json
    import shutil

    import diffusers
    import transformers

    folder = tmp_path / "sharded"
    shutil.copytree(sd_folder, folder)
    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("text_encoder", transformers.CLIPTextModel)):
        shutil.rmtree(folder / sub)
        cls.from_pretrained(str(sd_folder / sub)).save_pretrained(str(folder / sub), max_shard_size="200KB")
        assert len(list((folder / sub).glob("*-of-*.safetensors"))) > 1
        assert not [f for f in (folder / sub).glob("*.safetensors") if "-of-" not in f.name]  # no whole file left
    assert_same_weights(load_model(folder), load_model(sd_folder))
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    other = next(v for v in data["weight_map"].values() if v != data["weight_map"][key])
    index.write_text(json.dumps({**data, "weight_map": {**data["weight_map"], key: other}}))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is mapped to {other}, which does not hold it"):
        load_model(folder)


def test_diffusers_inpainting_folder_equals_the_single_file(tmp_path: Path, tokenizer_dir: Path,
                                                            vocab_size: int) -> None:
    config = toy_sd_config(vocab_size, in_channels=9)
    checkpoint = original_checkpoint(random_model(config, seed=6))
    path = write(checkpoint, tmp_path / "inpaint.safetensors")
    folder = save_diffusers_folder(checkpoint, config, tokenizer_dir, tmp_path / "inpaint-folder")
    from_folder = load_model(folder)
    from_file = load_model(path, tokenizer_dir=tokenizer_dir)
    assert from_folder.config.family == from_file.config.family == "sd_v1_inpainting"
    assert from_folder.config == dataclasses.replace(from_file.config, name="inpaint-folder")
    assert_same_weights(from_folder, from_file)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    outputs = [np.asarray(Pipeline(m).inpaint([SPEC], SETTINGS, [image], [Image.fromarray(mask)]).images[0])
               for m in (from_folder, from_file)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
