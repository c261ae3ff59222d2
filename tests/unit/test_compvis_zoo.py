"""The CompVis latent-diffusion zoo (compvis-zoo-contract.md): random-weight checkpoints built from each zoo
config's structure (tests/compvis_zoo.py) load with every key consumed, and their DDIM images (10 steps, eta 0,
x_T from a CPU generator seeded with the seed) match an independent implementation within the contract's
tolerance (mean |diff| <= 1/255, max <= 24/255). The contract's seven cases make their image with `ldm generate`
and exactly the contract's flags (`_generate`), so one run checks the command line, the library and the
arithmetic; the other models go through the library's Pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from models.checkpoints import CheckpointError, load_model
from models.compvis.config_yaml import CompVisConfigError, model_config
from models.conditioning import Box, ConditionError
from models.pipeline import Pipeline, RunSettings, SampleSpec
from tests.compvis_zoo import (
    CHURCHES_SCALE,
    CONFIGS,
    FIRST_STAGE_KL_F8,
    FIRST_STAGE_KL_F16,
    FIRST_STAGE_VQ_F4_NOATTN,
    FIRST_STAGE_VQ_F8,
    ZooFiles,
    assert_close_images,
    cond_unet,
    ddim_scheduler,
    first_stage,
    original_alphas_cumprod,
    original_ddim,
    part,
    to_uint8,
    unet2d,
    write_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SEED, STEPS = 7, 10
DDIM = RunSettings(sampler="ddim", steps=STEPS, eta=0.0)
UNET, FIRST, COND = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


def _x_T(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED))


def _generate(tmp_path: Path, ckpt: Path, *flags: str | Path) -> np.ndarray:
    """`ldm generate` with the case's flags and the contract's common ones (--sampler ddim --eta 0 --steps 10
    --seed N): the seven contract cases compare the command's PNG with the independent implementation, so the
    flags, the library and the arithmetic are checked in one run."""
    from PIL import Image

    from service.cli import main

    out = tmp_path / "out.png"
    common = ["--sampler", "ddim", "--eta", "0", "--steps", str(STEPS), "--seed", str(SEED), "-o", str(out)]
    assert main(["generate", *map(str, flags), "--model", str(ckpt), *common]) == 0
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def _config(name: str) -> Any:
    return model_config(yaml.safe_load(CONFIGS[name]), name, CHURCHES_SCALE if name == "lsun_churches256" else None)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooFiles:
    """The module's checkpoints, each written once (tests that change a file write their own)."""
    return ZooFiles(tmp_path_factory.mktemp("zoo"))


def _load(zoo: ZooFiles, name: str, **options: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    folder, sd = zoo.get(name, **options)
    return load_model(folder / "model.ckpt"), sd


# ------------------------------------------------------------------------------------------- config reading


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_reads(name: str) -> None:
    scale = CHURCHES_SCALE if name == "lsun_churches256" else None
    config = model_config(yaml.safe_load(CONFIGS[name]), name, scale)
    assert config.unet.legacy == (name != "txt2img-1p4B-eval")  # its config says legacy: False
    assert config.schedule.beta_schedule == "scaled_linear"  # CompVis "linear" = linear in sqrt(beta)


def test_heads_follow_the_legacy_rule() -> None:
    """cin256-v2: num_heads 1 -> one full-width head everywhere; text2img: num_head_channels 32 -> ch / 32."""
    cin = model_config(yaml.safe_load(CONFIGS["cin256-v2"]), "cin").unet
    assert [cin.heads(c) for c in (64, 96, 160)] == [(1, 64), (1, 96), (1, 160)]
    t2i = model_config(yaml.safe_load(CONFIGS["text2img256"]), "t2i").unet
    assert [t2i.heads(c) for c in (64, 96, 160)] == [(2, 32), (3, 32), (5, 32)]


def test_unknown_target_and_parameter_are_named() -> None:
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["unet_config"]["target"] = "my.own.UNet"
    with pytest.raises(CompVisConfigError, match="my.own.UNet"):
        model_config(data, "x")
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["unet_config"]["params"]["use_new_attention_order"] = True
    with pytest.raises(CompVisConfigError, match="use_new_attention_order"):
        model_config(data, "x")
    data = yaml.safe_load(CONFIGS["celeba256"])
    data["model"]["params"]["mystery"] = 3
    with pytest.raises(CompVisConfigError, match="mystery"):
        model_config(data, "x")


def test_scale_by_std_needs_the_buffer() -> None:
    with pytest.raises(CompVisConfigError, match="scale_factor"):
        model_config(yaml.safe_load(CONFIGS["lsun_churches256"]), "churches")


# ------------------------------------------------------------------------------------------- loading


def test_every_key_consumed_and_extras_tolerated(zoo: ZooFiles) -> None:
    model, sd = _load(zoo, "celeba256", ema=True, ddim_buffers=True)
    loaded = model.original_state_dict()  # type: ignore[attr-defined]
    weights = {k for k in sd if k.startswith((UNET, FIRST, COND))}
    assert set(loaded) == weights
    assert all(torch.equal(loaded[k], sd[k]) for k in weights)


def test_ema_weights_only_when_asked(zoo: ZooFiles) -> None:
    folder, sd = zoo.get("celeba256", ema=True)
    ema = load_model(folder / "model.ckpt", use_ema=True).unet.state_dict()
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ema[key], sd["model_ema.diffusion_model" + key.replace(".", "")])
    assert not torch.equal(ema[key], sd[UNET + key])
    with pytest.raises(CheckpointError, match="EMA"):
        load_model(zoo.ckpt("cin256-v2"), use_ema=True)


def test_unexpected_and_missing_keys_are_named(tmp_path: Path) -> None:
    sd = write_checkpoint(tmp_path / "m", "celeba256")
    sd["first_stage_model.extra.weight"] = torch.zeros(1)
    del sd[UNET + "out.2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "m" / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"out\.2\.bias.*extra\.weight|extra\.weight.*out\.2\.bias"):
        load_model(tmp_path / "m" / "model.ckpt")


def test_explicit_config_path(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m", "cin256-v2")
    (tmp_path / "m" / "model.ckpt").rename(tmp_path / "weights.ckpt")
    (tmp_path / "m" / "config.yaml").rename(tmp_path / "cin.yaml")
    model = load_model(tmp_path / "weights.ckpt", config=tmp_path / "cin.yaml")
    assert model.config.conditioner is not None and model.config.conditioner.n_classes == 1000


# ------------------------------------------------------------------------------------------- images


def test_celeba256_matches_ldm_pipeline(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--task unconditional`. Unconditional, VQ-f4, legacy attention with ch/32 heads: diffusers' LDMPipeline
    (UNet2DModel + VQModel)."""
    import diffusers

    folder, sd = zoo.get("celeba256")
    config = _config("celeba256")
    ours = _generate(tmp_path, folder / "model.ckpt", "--task", "unconditional")  # 32 px: image_size 8 x f4
    pipe = diffusers.LDMPipeline(vqvae=first_stage(part(sd, FIRST), config.autoencoder, 1.0),
                                 unet=unet2d(part(sd, UNET), config.unet), scheduler=ddim_scheduler(0.0015, 0.0195))
    pipe.unet.config.sample_size = 8
    theirs = pipe(batch_size=1, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.0,
                  num_inference_steps=STEPS, output_type="np").images[0]
    assert_close_images(ours, (theirs * 255).round().astype(np.uint8))


def test_lsun_churches256_matches_ldm_pipeline(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--task unconditional`. Unconditional, KL-f8 with the checkpoint's scale_factor, scale-shift norm, ResBlock
    resampling, 8 heads at every level: LDMPipeline with UNet2DModel + AutoencoderKL."""
    import diffusers

    folder, sd = zoo.get("lsun_churches256")
    model = load_model(folder / "model.ckpt")
    config = model.config
    assert config.scale_factor == pytest.approx(CHURCHES_SCALE)  # read from the checkpoint's buffer
    ours = _generate(tmp_path, folder / "model.ckpt", "--task", "unconditional")  # 128 px: image_size 16 x f8
    pipe = diffusers.LDMPipeline(vqvae=first_stage(part(sd, FIRST), config.autoencoder, CHURCHES_SCALE),
                                 unet=unet2d(part(sd, UNET), config.unet), scheduler=ddim_scheduler(0.0015, 0.0155))
    pipe.unet.config.sample_size = 16
    theirs = pipe(batch_size=1, generator=torch.Generator("cpu").manual_seed(SEED), eta=0.0,
                  num_inference_steps=STEPS, output_type="np").images[0]
    assert_close_images(ours, (theirs * 255).round().astype(np.uint8))


def _cin_reference(sd: dict[str, torch.Tensor], config: object, label: int, scale: float) -> np.ndarray:
    """No pipeline exists for cin256-v2; the original's arithmetic (notebook + ddim.py), step by step, with
    diffusers' UNet2DConditionModel (one head per level, converted by diffusers) and VQModel:
    c = embedding[label][:, None], uc = embedding[1000][:, None]; e = e_u + s (e_c - e_u) from one doubled
    batch; DDIM eta 0 (tests/compvis_zoo.original_ddim); z / scale_factor (1.0), quantise, decode."""
    unet = cond_unet(part(sd, UNET), config.unet)  # type: ignore[attr-defined]
    vq = first_stage(part(sd, FIRST), config.autoencoder, 1.0)  # type: ignore[attr-defined]
    table = sd[COND + "embedding.weight"]
    c, uc = table[[label]][:, None], table[[1000]][:, None]

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_u, e_c = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
        return e_u + scale * (e_c - e_u)

    with torch.no_grad():
        z = original_ddim(eps, _x_T((1, 3, 8, 8)), original_alphas_cumprod(0.0015, 0.0195), STEPS)
        return to_uint8(vq.decode(z / 1.0).sample)


def test_cin256_v2_matches_the_original_arithmetic(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--class 207 --guidance 3.0` (32 px: image_size 8 x f4)."""
    folder, sd = zoo.get("cin256-v2")
    ours = _generate(tmp_path, folder / "model.ckpt", "--class", "207", "--guidance", "3.0")
    assert_close_images(ours, _cin_reference(sd, _config("cin256-v2"), 207, 3.0))


def test_cin256_v2_heads_are_read_not_assumed(tmp_path: Path, zoo: ZooFiles) -> None:
    """The same weights with 8 heads (the SD convention a shape-based loader assumes) give another image."""
    model, _ = _load(zoo, "cin256-v2")
    text = CONFIGS["cin256-v2"].replace("num_heads: 1", "num_heads: 8")
    write_checkpoint(tmp_path / "eight", "cin256-v2", yaml_text=text)
    eight = load_model(tmp_path / "eight" / "model.ckpt")
    assert eight.unet.config.heads(64) == (8, 8) and model.unet.config.heads(64) == (1, 64)  # type: ignore[attr-defined]
    settings = dataclasses.replace(DDIM, width=32, height=32, steps=3)
    spec = [SampleSpec(seed=SEED, guidance_scale=3.0)]
    one = np.asarray(Pipeline(model, optimize=False).class2img(spec, settings, [207]).images[0], dtype=np.float64)  # type: ignore[arg-type]
    many = np.asarray(Pipeline(eight, optimize=False).class2img(spec, settings, [207]).images[0], dtype=np.float64)
    assert np.abs(one - many).mean() > 2.0


def _all_keys_consumed(model: Any, sd: dict[str, torch.Tensor]) -> None:
    loaded = model.original_state_dict()
    weights = {k for k in sd if k.startswith((UNET, FIRST, COND))}
    assert set(loaded) == weights and all(torch.equal(loaded[k], sd[k]) for k in weights)


def test_cin256_samples_unguided_and_refuses_guidance(zoo: ZooFiles) -> None:
    """cin256 (LDM-8): ClassEmbedder with its default 1000 rows, no null class. The original samples it
    class-conditionally only: c = embedding[label][:, None] (ClassEmbedder.forward), e = UNet(x, t, c) (no
    unconditional pass), DDIM eta 0, z / 1.0, quantise, decode; here with diffusers' UNet2DConditionModel and
    VQModel (VQ-f8 with its decoder's attention). Guidance != 1 and unconditional sampling are refused."""
    model, sd = _load(zoo, "cin256")
    _all_keys_consumed(model, sd)
    config = model.config  # type: ignore[attr-defined]
    assert sorted(config.tasks) == ["class"] and sd[COND + "embedding.weight"].shape[0] == 1000
    pipe = Pipeline(model, optimize=False)  # type: ignore[arg-type]
    settings = dataclasses.replace(DDIM, width=32, height=32)
    ours = pipe.class2img([SampleSpec(seed=SEED, guidance_scale=1.0)], settings, [207])
    unet, vq = cond_unet(part(sd, UNET), config.unet), first_stage(part(sd, FIRST), config.autoencoder, 1.0)
    c = sd[COND + "embedding.weight"][[207]][:, None]
    with torch.no_grad():
        z = original_ddim(lambda x, t: unet(x, t, encoder_hidden_states=c).sample, _x_T((1, 4, 4, 4)),
                          original_alphas_cumprod(0.0015, 0.0195), STEPS)
        theirs = to_uint8(vq.decode(z).sample)
    assert_close_images(np.asarray(ours.images[0]), theirs)
    with pytest.raises(ConditionError, match="no null class"):
        pipe.class2img([SampleSpec(seed=SEED, guidance_scale=3.0)], settings, [207])
    with pytest.raises(ValueError, match="0..999"):
        pipe.class2img([SampleSpec(seed=SEED, guidance_scale=1.0)], settings, [1000])
    with pytest.raises(ValueError, match="no null condition"):
        pipe.unconditional([SampleSpec(seed=SEED)], settings)


def test_layout2img_openimages_mirrors_the_original(zoo: ZooFiles) -> None:
    """layout2img-openimages256: BERTEmbedder(use_tokenizer=False) reads taming's box tokens as they are. The
    tokens are written out here by hand (worked out in tests/unit/test_compvis_boxes.py), the encoder is
    diffusers' LDMBertModel (vocabulary 8192, 92 positions, no attention mask), the UNet diffusers'
    UNet2DConditionModel (transformer_depth 3, ch/32 heads); no classifier-free guidance (the original samples it
    conditionally), DDIM eta 0, VQ-f4 decode."""
    model, sd = _load(zoo, "layout2img-openimages256")
    _all_keys_consumed(model, sd)
    config = model.config  # type: ignore[attr-defined]
    assert sorted(config.tasks) == ["layout"]
    boxes = [Box(5, 0.25, 0.5, 0.75, 1.0), Box(339, 0.1, 0.2, 0.7, 0.9)]
    tokens = [5, 3982, 8077, 339, 1629, 7262] + [8191] * 84 + [0, 8099]
    pipe = Pipeline(model, optimize=False)  # type: ignore[arg-type]
    settings = dataclasses.replace(DDIM, width=32, height=32)
    ours = pipe.layout2img([SampleSpec(seed=SEED, guidance_scale=1.0)], settings, [boxes])
    bert = _ldmbert(sd, 32, 2, vocab=8192, positions=92)
    unet, vq = cond_unet(part(sd, UNET), config.unet), first_stage(part(sd, FIRST), config.autoencoder, 1.0)
    with torch.no_grad():
        c = bert(torch.tensor([tokens]))[0]
        z = original_ddim(lambda x, t: unet(x, t, encoder_hidden_states=c).sample, _x_T((1, 3, 8, 8)),
                          original_alphas_cumprod(0.0015, 0.0205), STEPS)
        theirs = to_uint8(vq.decode(z).sample)
    assert_close_images(np.asarray(ours.images[0]), theirs)
    with pytest.raises(ConditionError, match="no null layout"):
        pipe.layout2img([SampleSpec(seed=SEED, guidance_scale=3.0)], settings, [boxes])


def _ldmbert(sd: dict[str, torch.Tensor], width: int, depth: int, vocab: int = 30522, positions: int = 77) -> Any:
    """diffusers' LDMBertModel holding the x-transformers encoder's weights (the renaming of diffusers'
    LDM text2img conversion: layers 2i = [norm, attention], 2i+1 = [norm, feed-forward])."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    config = LDMBertConfig(vocab_size=vocab, max_position_embeddings=positions, encoder_layers=depth,
                           encoder_ffn_dim=4 * width, encoder_attention_heads=8, head_dim=64, d_model=width,
                           dropout=0.0)
    renames = {"0": "self_attn_layer_norm", "1.to_q": "self_attn.q_proj", "1.to_k": "self_attn.k_proj",
               "1.to_v": "self_attn.v_proj", "1.to_out": "self_attn.out_proj"}
    ff = {"0": "final_layer_norm", "1.net.0.0": "fc1", "1.net.2": "fc2"}
    converted = {}
    for key, tensor in part(sd, COND + "transformer.").items():
        fixed = {"token_emb.weight": "model.embed_tokens.weight", "pos_emb.emb.weight": "model.embed_positions.weight",
                 "norm.weight": "model.layer_norm.weight", "norm.bias": "model.layer_norm.bias",
                 "to_logits.weight": "to_logits.weight", "to_logits.bias": "to_logits.bias"}
        if key in fixed:
            converted[fixed[key]] = tensor
            continue
        index, rest = key[len("attn_layers.layers."):].split(".", 1)
        inner, leaf = rest.rsplit(".", 1)
        table = renames if int(index) % 2 == 0 else ff
        converted[f"model.layers.{int(index) // 2}.{table[inner]}.{leaf}"] = tensor
    bert = LDMBertModel(config)
    bert.load_state_dict(converted, strict=True)
    return bert.eval()


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "painting", "of", "the", "fox", "dog", "##es", "red",
         "photo", "##ing", "paint", "an", "old", "house", "."]


@pytest.mark.parametrize(("name", "size", "schedule"), [("text2img256", 32, (0.0015, 0.0195)),
                                                      ("txt2img-1p4B-eval", 64, (0.00085, 0.012))])
def test_text_models_match_ldm_text_to_image_pipeline(tmp_path: Path, zoo: ZooFiles, name: str, size: int,
                                                      schedule: tuple[float, float]) -> None:
    """`"a painting of a fox" --tokenizer DIR --guidance 5.0` (at the configs' sizes: image_size x f). BERT
    x-transformers encoder (WordPiece from vocab.txt, 77 tokens, no mask), SpatialTransformer UNet (ch/32 heads;
    text2img-large: 8), CFG 5 against "": diffusers' LDMTextToImagePipeline with LDMBertModel. text2img256 has a
    VQ-f4 first stage (scale 1), text2img-large (txt2img-1p4B-eval) KL-f8 with scale_factor 0.18215."""
    import diffusers
    from transformers import BertTokenizerFast

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    folder, sd = zoo.get(name)
    config = _config(name)
    assert config.default_size == size
    prompt = "a painting of a fox"
    ours = _generate(tmp_path, folder / "model.ckpt", prompt, "--tokenizer", tok, "--guidance", "5.0")
    pipe = diffusers.LDMTextToImagePipeline(
        vqvae=first_stage(part(sd, FIRST), config.autoencoder, config.scale_factor), bert=_ldmbert(sd, 32, 2),
        tokenizer=BertTokenizerFast.from_pretrained(str(tok)),  # the original: from_pretrained(hub name)
        unet=cond_unet(part(sd, UNET), config.unet), scheduler=ddim_scheduler(*schedule))
    # the pipeline sizes latents as height // 8: 64 // 8 = 8 = 32 // 4 (VQ-f4 at 32 px) = 64 // 8 (KL-f8 at 64 px)
    theirs = pipe(prompt, height=64, width=64, guidance_scale=5.0, eta=0.0, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
    assert_close_images(ours, (theirs * 255).round().astype(np.uint8))


def test_bsr_sr_matches_ldm_super_resolution_pipeline(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--task upscale --image lr.png`. LR RGB/255 * 2 - 1 concatenated as is (6-channel UNet, latent = LR
    size), no CFG, one pass: diffusers' LDMSuperResolutionPipeline (it draws x_T [1, 3, h, w] from the
    generator, as the contract)."""
    import diffusers
    from PIL import Image

    folder, sd = zoo.get("bsr_sr")
    config = _config("bsr_sr")
    rng = np.random.default_rng(0)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    low.save(tmp_path / "lr.png")
    ours = _generate(tmp_path, folder / "model.ckpt", "--task", "upscale", "--image", tmp_path / "lr.png")
    assert ours.shape == (32, 32, 3)  # 4 x the input
    pipe = diffusers.LDMSuperResolutionPipeline(vqvae=first_stage(part(sd, FIRST), config.autoencoder, 1.0),
                                                unet=unet2d(part(sd, UNET), config.unet),
                                                scheduler=ddim_scheduler(0.0015, 0.0155))
    lr = torch.from_numpy(np.asarray(low, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    theirs = pipe(image=lr, num_inference_steps=STEPS, eta=0.0, generator=torch.Generator("cpu").manual_seed(SEED),
                  output_type="np").images[0]
    assert_close_images(ours, (theirs * 255).round().astype(np.uint8))


def _blocky_labels(size: int, n_labels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, n_labels, (size // 8, size // 8)), np.ones((8, 8), dtype=np.int64))


def test_semantic_synthesis256_mirrors_the_original(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--map map.png` (mode L, pixel = label). No independent pipeline exists. The original's arithmetic, step
    by step: one-hot {0, 1} over 182 labels at the map's size; SpatialRescaler = F.interpolate(bilinear, scale
    0.5) twice, then the 1x1 conv without bias (`channel_mapper`); UNet input cat([z_t, c]) (diffusers
    UNet2DModel); no CFG; DDIM as ddim.py; decode with quantisation (diffusers VQModel)."""
    import torch.nn.functional as F
    from PIL import Image

    folder, sd = zoo.get("semantic_synthesis256")
    config = _config("semantic_synthesis256")
    labels = _blocky_labels(32, 182, 1)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp_path / "map.png")
    ours = _generate(tmp_path, folder / "model.ckpt", "--map", tmp_path / "map.png")
    unet = unet2d(part(sd, UNET), config.unet)
    vq = first_stage(part(sd, FIRST), config.autoencoder, 1.0)
    one_hot = F.one_hot(torch.from_numpy(labels), 182).permute(2, 0, 1)[None].float()
    c = F.interpolate(F.interpolate(one_hot, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    c = F.conv2d(c, sd[COND + "channel_mapper.weight"])

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(torch.cat([x, c], dim=1), t).sample

    with torch.no_grad():
        z = original_ddim(eps, _x_T((1, 3, 8, 8)), original_alphas_cumprod(0.0015, 0.0205), STEPS)
        reference = to_uint8(vq.decode(z).sample)
    assert_close_images(ours, reference)
    model = load_model(folder / "model.ckpt")  # no null map: guidance is refused, not quietly turned off
    with pytest.raises(ConditionError, match="guidance scale 2 needs an unconditional input, but model .* has no "
                                             "null label map"):
        Pipeline(model).semantic2img([SampleSpec(seed=SEED, guidance_scale=2.0)], DDIM,  # type: ignore[arg-type]
                                     [Image.fromarray(labels.astype(np.uint8), mode="L")])


def test_inpainting_big_mirrors_scripts_inpaint(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--task inpaint --image image.png --mask mask.png`. No independent pipeline exists; scripts/inpaint.py
    step by step: image = RGB/255, mask = L/255 binarised at 0.5, masked = (1 - mask) image, all three x -> 2x - 1;
    c = cat([VQ encode(masked) (quant_conv output), interpolate(mask, latent size) (nearest)]); UNet input cat([z_t,
    c]) (3 + 3 + 1, diffusers UNet2DModel with ResBlock resampling); no CFG; DDIM; decode (quantised, diffusers
    VQModel, no mid attention); output = (1 - m) image + m clamp((x + 1) / 2). The checkpoint carries the ddim_*
    buffers and the first stage twice."""
    import torch.nn.functional as F
    from PIL import Image

    folder, sd = zoo.get("inpainting_big", ddim_buffers=True, first_stage_copy=True)
    config = _config("inpainting_big")
    rng = np.random.default_rng(3)
    pixels = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    pixels = np.clip(pixels.astype(np.int64) + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[6:22, 10:30] = 255
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(hole, mode="L").save(tmp_path / "mask.png")
    ours = _generate(tmp_path, folder / "model.ckpt", "--task", "inpaint", "--image", tmp_path / "image.png",
                     "--mask", tmp_path / "mask.png")
    assert np.array_equal(ours[hole == 0], pixels[hole == 0])  # unmasked pixels come back exactly

    unet = unet2d(part(sd, UNET), config.unet)
    vq = first_stage(part(sd, FIRST), config.autoencoder, 1.0)
    img = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mask = torch.from_numpy(hole.astype(np.float32) / 255.0)[None, None]
    mask = (mask >= 0.5).float()
    masked = (1 - mask) * img
    img, mask, masked = img * 2 - 1, mask * 2 - 1, masked * 2 - 1
    with torch.no_grad():
        c = vq.encode(masked).latents
        c = torch.cat([c, F.interpolate(mask, size=c.shape[-2:])], dim=1)

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(torch.cat([x, c], dim=1), t).sample

        z = original_ddim(eps, _x_T((1, 3, 8, 8)), original_alphas_cumprod(0.0015, 0.0205), STEPS)
        predicted = ((vq.decode(z).sample + 1) / 2).clamp(0, 1)
    m = ((mask + 1) / 2).clamp(0, 1)
    inpainted = (1 - m) * ((img + 1) / 2).clamp(0, 1) + m * predicted
    reference = (inpainted * 255).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert_close_images(ours[hole > 0][None], reference[hole > 0][None])


# ------------------------------------------------------------------------------------------- first stages

FIRST_STAGES = {"kl-f8": FIRST_STAGE_KL_F8, "kl-f16": FIRST_STAGE_KL_F16, "vq-f8": FIRST_STAGE_VQ_F8,
                "vq-f4-noattn": FIRST_STAGE_VQ_F4_NOATTN}


@pytest.mark.parametrize("name", sorted(FIRST_STAGES))
def test_first_stage_reconstructs_as_diffusers(tmp_path: Path, name: str) -> None:
    """`ldm reconstruct`'s library part: a first-stage checkpoint (keys without prefix, the loss's networks under
    `loss.*`) loads strictly; its reconstruction matches diffusers' AutoencoderKL (posterior mean) / VQModel
    (quantised) within the contract's tolerance."""
    from PIL import Image

    from models.autoencoder import Autoencoder
    from models.compvis.first_stage import first_stage_from_yaml, load_first_stage, psnr, reconstruct
    from tests.helpers import randomize

    (tmp_path / "config.yaml").write_text(FIRST_STAGES[name], encoding="utf-8")
    config = first_stage_from_yaml(tmp_path / "config.yaml")
    sd = randomize(Autoencoder(config), 5).state_dict()
    torch.save({"state_dict": {**sd, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
                               torch.ones(4, 3, 4, 4)}}, tmp_path / "model.ckpt")
    autoencoder = load_first_stage(tmp_path / "model.ckpt", tmp_path / "config.yaml")
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    image = Image.fromarray(pixels)
    ours = reconstruct(autoencoder, image)
    theirs_model = first_stage(dict(sd), config, 1.0)
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        encoded = theirs_model.encode(x)
        z = encoded.latent_dist.mode() if config.kind == "kl" else encoded.latents
        theirs = to_uint8(theirs_model.decode(z).sample)
    assert_close_images(np.asarray(ours), theirs)
    assert psnr(ours, Image.fromarray(theirs)) > 30 and psnr(image, image) == float("inf")
    torch.save({"state_dict": {**sd, "encoder.extra": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="encoder.extra"):
        load_first_stage(tmp_path / "bad.ckpt", tmp_path / "config.yaml")


# ------------------------------------------------------------------------------------------- served


def test_worker_runner_serves_zoo_models_with_their_tasks_and_labels(zoo: ZooFiles) -> None:
    """`ldm worker --model DIR/model.ckpt` (Runner.load): named after its folder, the tasks its conditioning
    allows, the labels front ends check; an inpaint job runs through the zoo's masked-image conditioning."""
    import io

    from PIL import Image

    from service.schemas import GenerationRequest, Task
    from service.worker.runner import Runner, SampleInput

    inpaint = {"ddim_buffers": True, "first_stage_copy": True}
    runners = {name: Runner.load(str(zoo.ckpt(name, **(inpaint if name == "inpainting_big" else {}))), device="cpu")
               for name in ("cin256-v2", "inpainting_big", "semantic_synthesis256", "celeba256", "bsr_sr")}
    assert {n: r.name for n, r in runners.items()} == {n: n for n in runners}
    assert {n: sorted(t.value for t in r.tasks) for n, r in runners.items()} == {
        "cin256-v2": ["class", "unconditional"], "inpainting_big": ["inpaint"], "semantic_synthesis256": ["semantic"],
        "celeba256": ["unconditional"], "bsr_sr": ["upscale"]}
    labels = {n: r.labels.n_classes if r.labels else None for n, r in runners.items()}
    assert labels == {"cin256-v2": 1000, "inpainting_big": None, "semantic_synthesis256": 181, "celeba256": None,
                      "bsr_sr": None}

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    runner = runners["inpainting_big"]
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hole = np.zeros((32, 32), dtype=np.uint8)
    hole[8:24, 8:24] = 255
    job = GenerationRequest(model="inpainting_big", task=Task.inpaint, prompt="", width=32, height=32, steps=2,
                            seed=1, image="x", mask="x")
    image, mask = runner.inputs(job, png(picture), png(Image.fromarray(hole, mode="L")), max_pixels=10**6)
    out = runner.run(runner.batch_key(job, image), [SampleInput(job, 1, image, mask)])[0]
    assert out is not None
    result = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))
    assert np.array_equal(result[hole == 0], np.asarray(picture)[hole == 0])


def test_worker_runner_serves_the_unguided_zoo_models(zoo: ZooFiles) -> None:
    """cin256 and layout2img-openimages256 register their one task and labels (1000 classes; 340 categories, at
    most 30 boxes) and guidance 1 as their default; a job at guidance 1 runs, one without guidance runs at 1, one at
    the task's usual default (5 for class, 3 for layout) fails as invalid_input, naming the missing null input."""
    import io

    from PIL import Image

    from service.schemas import GenerationRequest, LayoutBox, Task
    from service.worker.runner import JobFailure, Runner, SampleInput

    cin, layout = (Runner.load(str(zoo.ckpt(name)), device="cpu")
                   for name in ("cin256", "layout2img-openimages256"))
    assert [t.value for t in cin.tasks] == ["class"] and [t.value for t in layout.tasks] == ["layout"]
    assert cin.labels is not None and (cin.labels.n_classes, cin.labels.max_boxes) == (1000, None)
    assert layout.labels is not None and (layout.labels.n_classes, layout.labels.max_boxes) == (340, 30)
    boxes = [LayoutBox(label=5, box=(0.25, 0.5, 0.75, 1.0))]
    job = GenerationRequest(model=layout.name, task=Task.layout, layout=boxes, width=32, height=32, steps=2, seed=1,
                            guidance_scale=1.0)
    layout.check(job)
    out = layout.run(layout.batch_key(job, None), [SampleInput(job, 1, None, None)])[0]
    assert out is not None and Image.open(io.BytesIO(out)).size == (32, 32)
    assert layout.default_guidance == {Task.layout: 1.0} and cin.default_guidance == {Task.class_: 1.0}
    assert (layout.missing_null, cin.missing_null) == ("null layout", "null class")
    unset = GenerationRequest(model=cin.name, task=Task.class_, class_label=207, steps=2)
    cin.check(unset)
    assert unset.guidance_scale is None and cin.guidance(unset) == 1.0
    for runner, task_default in ((layout, job.model_copy(update={"guidance_scale": 3.0})),
                                 (cin, unset.model_copy(update={"guidance_scale": 5.0}))):
        with pytest.raises(JobFailure, match="guidance_scale 1"):
            runner.check(task_default)


@pytest.mark.parametrize("name", ["semantic_synthesis256", "text2img256", "layout2img-openimages256", "cin256"])
def test_converted_to_our_format_loads_without_its_yaml(tmp_path: Path, zoo: ZooFiles, name: str) -> None:
    """`ldm convert`: save_model writes the original layout with our config in the metadata; it loads back alone."""
    from models.checkpoints import save_model

    model = load_model(zoo.ckpt(name))
    path = save_model(model, tmp_path / f"{name}.safetensors")
    again = load_model(path)
    assert again.config == model.config
    ours, theirs = model.original_state_dict(), again.original_state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
