"""SDXL prompts as A1111 and diffusers read them: emphasis, BREAK and chunks on both text encoders, textual-inversion
embeddings with one vector set per encoder, and `ldm generate --refiner`.

The A1111 reference is computed here from the published algorithm (modules/sd_hijack_clip.py, run by A1111 on
each of sgm's two text embedders; modules/sd_models_xl.py) with transformers' tokenizers and the diffusers
twin's own text encoders: each run of text tokenized alone, each 75-token chunk framed [begin, tokens, end,
padding] (ViT-L pads with the end token, bigG with "!" after one end token), encoded alone (penultimate hidden
states), multiplied by its weights and rescaled to its unweighted mean; the chunks follow one another, the two
encoders sit side by side, and the pooled vector is bigG's for the first chunk (`zs[0].pooled`). Embeddings are
checked against diffusers' `load_textual_inversion` on each encoder. Models: tests/sdxl_twins.py, reduced width.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.checkpoints import load_model
from models.ldm import LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec
from models.prompt_weighting import PromptSyntaxError
from models.textual_inversion import load_embeddings_dir
from tests.helpers import TOL, torch_threads, write_clip_tokenizer
from tests.sdxl_twins import PROJECTION, refiner_unet, scheduler_config, sdxl_pipeline

SETTINGS = RunSettings(sampler="ddim", steps=2, width=64, height=64)


class Twins:
    """diffusers' SDXL base and refiner at reduced width, their folders, and ours loaded from them."""

    def __init__(self, tmp: Path) -> None:
        self.pipe = sdxl_pipeline(write_clip_tokenizer(tmp / "vocab"))
        self.folder = tmp / "base"
        self.pipe.save_pretrained(str(self.folder), safe_serialization=True)
        self.base = load_model(self.folder)
        self.refiner_pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=self.pipe.vae, text_encoder=None, text_encoder_2=copy.deepcopy(self.pipe.text_encoder_2),
            tokenizer=None, tokenizer_2=self.pipe.tokenizer_2, unet=refiner_unet(),
            scheduler=diffusers.DDIMScheduler.from_config(scheduler_config()), requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
        self.refiner_folder = tmp / "refiner"
        self.refiner_pipe.save_pretrained(str(self.refiner_folder), safe_serialization=True)
        self.refiner = load_model(self.refiner_folder)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    with torch_threads(1):
        return Twins(tmp_path_factory.mktemp("sdxl-prompts"))


def conditioning(model: LatentDiffusion, prompt: str, **pipeline: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Our (context, pooled, negative context) of one prompt (negative prompt "") as a txt2img run starts."""
    started = Pipeline(model, optimize=False, **pipeline).start_txt2img([SampleSpec(prompt)], SETTINGS)
    sample = started.samples[0]
    assert sample.cond.context is not None and sample.cond.vector is not None and sample.uncond.context is not None
    return sample.cond.context, sample.cond.vector[:, :PROJECTION], sample.uncond.context


def a1111_reference(pipe: Any, runs: list[tuple[str, float] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's SDXL conditioning of parsed runs ((text, weight); None = BREAK): (context, pooled)."""
    contexts, pooled = [], None
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        chunks: list[tuple[list[int], list[float]]] = [([], [])]
        for run in runs:
            if run is None:
                chunks.append(([], []))
                continue
            ids = tokenizer(run[0], add_special_tokens=False).input_ids
            chunks[-1][0].extend(ids)
            chunks[-1][1].extend([run[1]] * len(ids))
        # past 75 tokens a chunk goes on in the next (no comma here to move the cut to)
        chunks = [(ids[i : i + 75], weights[i : i + 75]) for ids, weights in chunks
                  for i in range(0, max(len(ids), 1), 75)]
        zs = []
        for i, (ids, weights) in enumerate(chunks):
            pad = 75 - len(ids)
            framed = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad]
            out = encoder(torch.tensor([framed]), output_hidden_states=True)
            z = out.hidden_states[-2]
            if i == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
            w = torch.tensor([1.0, *weights, 1.0, *[1.0] * pad])[None, :, None]
            zs.append(z * w * (z.mean() / (z * w).mean()))
        contexts.append(torch.cat(zs, dim=1))
    assert pooled is not None
    return torch.cat(contexts, dim=-1), pooled


def test_a1111_syntax_on_both_encoders_as_a1111(twins: Twins) -> None:
    """Emphasis and BREAK: both encoders get the same weighted chunks, the pooled vector is the first chunk's; the
    empty negative prompt stays zeros (force_zeros_for_empty_prompt); a prompt without syntax is diffusers'
    conditioning; prompt editing is refused by name."""
    prompt = "a (red:1.5) circle, [blue] square BREAK (on the left)"
    runs = [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0), ("blue", 1 / 1.1), (" square", 1.0), None,
            ("on the left", 1.1)]
    with torch_threads(1), torch.inference_mode():
        expected, expected_pooled = a1111_reference(twins.pipe, runs)
        context, pooled, negative = conditioning(twins.base, prompt, prompt_syntax="a1111")
        plain_ctx, plain_pooled, _ = conditioning(twins.base, "a red circle", prompt_syntax="a1111")
        theirs, _, theirs_pooled, _ = twins.pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                                               do_classifier_free_guidance=True)
    assert context.shape == (1, 2 * 77, 64 + 128) and (context - expected).abs().max() < TOL
    assert (pooled - expected_pooled).abs().max() < TOL
    unweighted = a1111_reference(twins.pipe, [(r[0], 1.0) if r else None for r in runs])
    assert (expected - unweighted[0]).abs().max() > 1e-2  # the weights move the numbers
    assert negative.shape == (1, 77, 192) and negative.abs().max() == 0
    assert (plain_ctx - theirs).abs().max() < TOL and (plain_pooled - theirs_pooled).abs().max() < TOL
    long_runs = [("a ", 1.0), ("red circle", 1.2), (" and" + " blue square" * 10, 1.0)]  # past 75 tokens
    with torch_threads(1), torch.inference_mode():
        expected, expected_pooled = a1111_reference(twins.pipe, long_runs)
        context, pooled, _ = conditioning(twins.base, "a (red circle:1.2) and" + " blue square" * 10,
                                            prompt_syntax="a1111")
    assert context.shape == expected.shape == (1, 2 * 77, 192)  # 88 tokens
    assert (context - expected).abs().max() < TOL and (pooled - expected_pooled).abs().max() < TOL
    with pytest.raises(PromptSyntaxError, match=r"prompt editing and alternation \('\[cat:dog:0.5\]'\)"):
        conditioning(twins.base, "a [cat:dog:0.5]", prompt_syntax="a1111")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SDXL embedding file (A1111's / diffusers' layout): two vectors for each encoder."""
    g = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, 64, generator=g), "clip_g": torch.randn(2, 128, generator=g)}
    folder = tmp_path_factory.mktemp("embeddings")
    save_file(vectors, str(folder / "xl-style.safetensors"))
    return folder, vectors


@pytest.mark.parametrize("syntax", ["plain", "a1111"])
def test_sdxl_embeddings_match_diffusers_load_textual_inversion(twins: Twins, syntax: str,
                                                                embeddings: tuple[Path, dict[str, torch.Tensor]],
                                                                ) -> None:
    """A prompt naming an SDXL embedding conditions the base (both encoders, pooled included) and the refiner (bigG,
    `clip_g`) as diffusers does after `load_textual_inversion` of each vector set on its encoder."""
    folder, vectors = embeddings
    base, refiner = copy.deepcopy(twins.pipe), copy.deepcopy(twins.refiner_pipe)
    for pipe, key, encoder, tokenizer in ((base, "clip_l", base.text_encoder, base.tokenizer),
                                          (base, "clip_g", base.text_encoder_2, base.tokenizer_2),
                                          (refiner, "clip_g", refiner.text_encoder_2, refiner.tokenizer_2)):
        pipe.load_textual_inversion(vectors[key], token="<xl-style>", text_encoder=encoder, tokenizer=tokenizer)
    prompt = "a photo of <xl-style> dog"
    dbs = load_embeddings_dir(folder, twins.base)
    assert [(db.key, len(db)) for db in dbs] == [("clip_l", 1), ("clip_g", 1)]
    with torch_threads(1), torch.inference_mode():
        for pipe, ours in ((base, twins.base), (refiner, twins.refiner)):
            theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
            context, pooled, _ = conditioning(ours, prompt, prompt_syntax=syntax, embeddings=dbs)
            without, _, _ = conditioning(ours, prompt, prompt_syntax=syntax)
            assert (context - theirs).abs().max() < TOL and (pooled - theirs_pooled).abs().max() < TOL
            assert (without - theirs).abs().max() > 1e-2  # the vectors are used
        assert load_embeddings_dir(folder, twins.refiner)[0].key == "clip_g"


def test_ldm_generate_with_a_refiner(twins: Twins, tmp_path: Path) -> None:
    """`ldm generate --refiner DIR --refiner-switch F` writes the image of one base-then-refiner run of the library;
    the flags are refused where they do not apply."""
    from service.cli import main

    out = tmp_path / "refined.png"
    common = ["generate", "a (red:1.2) circle", "--model", str(twins.folder), "--steps", "4", "--width", "64",
              "--height", "64", "--seed", "5", "--sampler", "ddim", "--device", "cpu"]
    with torch_threads(1):
        assert main([*common, "--refiner", str(twins.refiner_folder), "--refiner-switch", "0.5", "-o", str(out)]) == 0
        assert main([*common, "-o", str(tmp_path / "base.png")]) == 0
        settings = RunSettings(sampler="ddim", steps=4, width=64, height=64, refiner_switch=0.5)
        pipeline = Pipeline(twins.base, optimize=False, prompt_syntax="a1111", refiner=twins.refiner)
        image = pipeline.txt2img([SampleSpec("a (red:1.2) circle", seed=5)], settings).images[0]

    def pixels(im: Image.Image) -> torch.Tensor:
        return torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.float32)

    written = Image.open(out)
    assert (pixels(written) - pixels(image)).abs().max() <= 1  # the CLI optimises for the CPU: a level may move
    assert (pixels(written) - pixels(Image.open(tmp_path / "base.png"))).abs().max() > 8  # the refiner worked
    assert written.text["refiner"] == str(twins.refiner_folder) and written.text["refiner_switch"] == "0.5"
    with pytest.raises(SystemExit, match="--refiner-switch needs --refiner PATH"):
        main([*common, "--refiner-switch", "0.5"])
    with pytest.raises(SystemExit, match="--refiner finishes txt2img images, not --task img2img"):
        main([*common, "--task", "img2img", "--image", str(out), "--refiner", str(twins.refiner_folder)])
    assert main([*common, "--refiner", str(twins.refiner_folder), "--refiner-switch", "1.5",
                 "-o", str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()
