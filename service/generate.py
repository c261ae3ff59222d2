"""`ldm generate`: load a model once, run prompts through the txt2img pipeline (or, with `--task`, a class
label, a layout, a label map or nothing through the other conditionings' pipelines), write PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from models.conditioning import Box, layout_to_json, parse_layout
from models.diffusion import PredictionType
from models.images import encode_png
from models.ldm import LatentDiffusion
from models.lora import load_lora, parse_lora_arg
from models.names import DTypeName, GpuMode, SamplerName, Task, WinogradPolicy, default_sampler
from models.pipeline import (
    GenerationResult,
    Pipeline,
    Progress,
    RunSettings,
    SampleSpec,
    UnsupportedTask,
    check_refiner,
)
from models.prompt_weighting import PromptSyntax
from models.resolve import pick_device, pick_dtype, resolve_model
from models.text.clip import CLIPTextConditioner
from models.text.sdxl import SDXLTextConditioner
from models.textual_inversion import load_embeddings_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    model: str = "tiny-shapes"
    seed: int = 0
    steps: int = 20
    #: None: the model's default (its config's `default_sampler`, else DPM-Solver++(2M); `models.names.default_sampler`)
    sampler: SamplerName | None = None
    karras: bool = False
    eta: float = 0.0
    #: classifier-free guidance scale; None: the task's default for the model (`models.names.default_guidance`:
    #: 1 for the CompVis zoo models without an unconditional input)
    guidance: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    n: int = 1
    tokenizer: Path | None = None
    #: SDXL's second tokenizer folder (bigG's), for single files
    tokenizer_2: Path | None = None
    device: str | None = None
    dtype: DTypeName | None = None
    #: which UNet and VAE convolutions the CPU path computes by Winograd (models.names.WINOGRAD_POLICIES)
    winograd: WinogradPolicy = "balanced"
    #: how a model on a GPU runs its UNet (models.names.GPU_MODES)
    gpu_mode: GpuMode = "graphs"
    use_ema: bool = False
    #: a CompVis zoo config.yaml for `model` (default: the one beside a .ckpt)
    config: Path | None = None
    #: img2img: how much of the image to change
    strength: float = 0.75
    #: upscale with the SD x4 upscaler: the noise level of its low-resolution input (None: the model's default)
    noise_level: int | None = None
    prediction_type: PredictionType | None = None
    #: LoRA files as PATH[:WEIGHT] (models/lora.py), applied to every image
    loras: tuple[str, ...] = ()
    #: how CLIP text encoders read prompts: a1111 (emphasis, BREAK, 75-token chunks) or plain (as diffusers)
    prompt_syntax: PromptSyntax = "a1111"
    #: a folder of textual-inversion embeddings prompts may name (models/textual_inversion.py)
    embeddings: Path | None = None
    #: txt2img with an SDXL base: the refiner model that finishes each image (a spec as `model`), and the fraction
    #: of the schedule the base denoises before it takes over (diffusers' denoising_end / denoising_start)
    refiner: str | None = None
    refiner_switch: float = 0.8


def generate(prompts: Sequence[str], options: GenerateOptions, *, out_file: Path | None = None,
             out_dir: Path | None = None) -> list[Path]:
    """One batch of `n` images per prompt; returns the files written.

    With `out_dir`, prompt i is written as NNN.png (NNN-k.png when n > 1) with seed `seed + i`;
    with `out_file`, the single prompt's images go to that file (stem-k.png when n > 1).
    """
    model, pipeline, settings = _load(options)
    if isinstance(model.conditioner, CLIPTextConditioner) and model.conditioner.tokenizer is None:
        raise ValueError(  # fail before any work, as a usage error rather than a crash mid-run
            f"model {options.model!r} has a CLIP text encoder but no tokenizer (a single checkpoint file carries "
            "none): give --tokenizer DIR, a folder with vocab.json and merges.txt such as the `tokenizer/` "
            "folder of a diffusers SD v1 repository"
        )
    for one in (model, *([pipeline.refiner.model] if pipeline.refiner is not None else [])):
        if isinstance(one.conditioner, SDXLTextConditioner):
            one.conditioner.require_tokenizers()  # a MissingTokenizerError naming --tokenizer / --tokenizer-2
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    loras = [parse_lora_arg(arg) for arg in options.loras]
    adapters = tuple((load_lora(path, model), weight) for path, weight in loras)
    lora_text = {"loras": json.dumps([{"path": p, "weight": w} for p, w in loras])} if loras else {}
    written: list[Path] = []
    guidance = options.guidance if options.guidance is not None else model.config.guidance_for("txt2img",
                                                                                                settings.sampler)
    for i, prompt in enumerate(prompts):
        first_seed = options.seed + i * options.n if out_dir is not None else options.seed  # no overlaps
        specs = [SampleSpec(prompt, options.negative_prompt, first_seed + k, guidance, adapters)
                 for k in range(options.n)]
        with _step_bar(f"prompt {i}", options.steps) as advance:
            result = pipeline.txt2img(specs, settings, progress=advance)
        items = [{**_spec_parameters(s), **lora_text, "task": "txt2img"} for s in specs]
        written += _save(result, settings, options, items,
                         [_output_path(out_file, out_dir, i, k, options.n) for k in range(options.n)])
    return written


def _spec_parameters(spec: SampleSpec) -> dict[str, object]:
    """A sample's parameters for its PNG text (the adapters, which hold tensors, are written as `loras`)."""
    defaults = asdict(SampleSpec())  # SDXL's micro-conditioning is written only where it is not the default
    micro = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score")
    return {k: v for k, v in asdict(replace(spec, adapters=())).items()
            if k != "adapters" and not (k in micro and v == defaults[k])}


def _load(options: GenerateOptions) -> tuple[LatentDiffusion, Pipeline, RunSettings]:
    """The model on its device, its pipeline, and the run's settings."""
    device = pick_device(options.device)
    dtype = pick_dtype(device, options.dtype)
    model = resolve_model(options.model, tokenizer=options.tokenizer, tokenizer_2=options.tokenizer_2,
                          device=device, dtype=dtype,
                          use_ema=options.use_ema, config=options.config, prediction_type=options.prediction_type)
    refiner = None
    if options.refiner is not None:  # loaded and checked before any work
        refiner = resolve_model(options.refiner, tokenizer=options.tokenizer, tokenizer_2=options.tokenizer_2,
                                device=device, dtype=dtype)
        check_refiner(model, refiner)
        if not 0.0 < options.refiner_switch < 1.0:
            raise ValueError(f"--refiner-switch must be within (0, 1), got {options.refiner_switch}")
    sampler = options.sampler or default_sampler(model.config.default_sampler, karras=options.karras)
    settings = RunSettings(sampler=sampler, steps=options.steps, width=options.width,
                           height=options.height, karras=options.karras, eta=options.eta, strength=options.strength,
                           noise_level=options.noise_level,
                           refiner_switch=options.refiner_switch if refiner is not None else None)
    embeddings = load_embeddings_dir(options.embeddings, model) if options.embeddings is not None else None
    return model, Pipeline(model, winograd=options.winograd, gpu=options.gpu_mode, prompt_syntax=options.prompt_syntax,
                           embeddings=embeddings, refiner=refiner), settings


@contextmanager
def _step_bar(desc: str, steps: int) -> Iterator[Progress]:
    """A tqdm bar of sampler steps, and the pipeline's progress callback that moves it."""
    with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:

        def advance(step: int, total: int) -> None:
            bar.total = total
            bar.update(step - bar.n)

        yield advance


def _save(result: GenerationResult, settings: RunSettings, options: GenerateOptions,
          items: Sequence[dict[str, object]], paths: Sequence[Path]) -> list[Path]:
    """Log the run's warnings; write each image with its parameters (its item's, the run's, its size, the model)
    as PNG text."""
    for warning in result.warnings:
        log.warning("%s", warning)
    for image, item, path in zip(result.images, items, paths, strict=True):
        params = {**item, **asdict(settings), "width": image.width, "height": image.height, "model": options.model}
        if options.refiner is not None:
            params["refiner"] = options.refiner
        if item.get("task") != "img2img":
            del params["strength"]  # img2img only
        path.write_bytes(encode_png(image, params))
    return list(paths)


def _output_path(out_file: Path | None, out_dir: Path | None, i: int, k: int, n: int) -> Path:
    suffix = f"-{k}" if n > 1 else ""
    if out_dir is not None:
        return out_dir / f"{i:03d}{suffix}.png"
    assert out_file is not None
    return out_file.with_name(f"{out_file.stem}{suffix}{out_file.suffix or '.png'}") if suffix else out_file


@dataclass(frozen=True)
class TaskInputs:
    """The condition of a non-text task: a class (name or id), a label-map PNG, or a layout JSON file."""

    class_label: str | None = None
    map_path: Path | None = None
    layout_path: Path | None = None
    image_path: Path | None = None
    mask_path: Path | None = None
    #: img2img, inpaint and upscale with a text model
    prompt: str = ""


_NEEDS = {"class": "class_label", "semantic": "map_path", "layout": "layout_path", "img2img": "image_path",
          "upscale": "image_path", "inpaint": "image_path"}
_FLAGS = {"class_label": "--class", "map_path": "--map", "layout_path": "--layout", "image_path": "--image",
          "mask_path": "--mask"}


def generate_task(task: Task, inputs: TaskInputs, options: GenerateOptions, *, out_file: Path) -> list[Path]:
    """`options.n` images of one class, layout, label map, input image, or unconditional samples (seeds
    seed..seed+n-1), written to `out_file` (stem-k.png when n > 1). Inputs are read and checked before the model
    loads."""
    if task == "txt2img":
        raise ValueError("generate_task is for the tasks other than txt2img; txt2img is `generate`")
    if options.loras:
        raise ValueError("--lora is applied to txt2img only for now, not --task " + task)
    needed = _NEEDS.get(task)
    if needed is not None and getattr(inputs, needed) is None:
        raise ValueError(f"--task {task} needs {_FLAGS[needed]}")
    if task == "inpaint" and inputs.mask_path is None:
        raise ValueError("--task inpaint needs --mask")
    for name, flag in _FLAGS.items():
        if getattr(inputs, name) is not None and name != needed and not (task == "inpaint" and name == "mask_path"):
            owners = "/".join(t for t, n in _NEEDS.items() if n == name) or "inpaint"
            raise ValueError(f"{flag} is for --task {owners}, not {task}")
    label_map = _read_map(inputs.map_path) if inputs.map_path is not None else None
    image = _read_image(inputs.image_path, "--image", "RGB") if inputs.image_path is not None else None
    mask = _read_image(inputs.mask_path, "--mask", "L") if inputs.mask_path is not None else None
    layout_data = _read_json(inputs.layout_path) if inputs.layout_path is not None else None
    model, pipeline, settings = _load(options)
    prompted = task in ("img2img", "inpaint", "upscale")
    if prompted and model.conditioner is None and (inputs.prompt or options.negative_prompt):
        raise UnsupportedTask(f"model {model.config.name!r} takes no prompt (it has no text encoder): --task {task} "
                              "runs it without one")
    guidance = options.guidance if options.guidance is not None else model.config.guidance_for(task, settings.sampler)
    specs = [SampleSpec(inputs.prompt, options.negative_prompt if prompted else "", options.seed + k,
                        guidance) for k in range(options.n)]
    extra: dict[str, object] = {}
    with _step_bar(task, options.steps) as advance:
        if task == "class":
            assert inputs.class_label is not None
            result = pipeline.class2img(specs, settings, [inputs.class_label] * options.n, progress=advance)
            extra["class"] = inputs.class_label
        elif task == "layout":
            boxes = _layout(model, layout_data)
            result = pipeline.layout2img(specs, settings, [boxes] * options.n, progress=advance)
            extra["layout"] = json.dumps(layout_to_json(boxes, model.config.conditioner.class_names
                                                        if model.config.conditioner else ()))
        elif task in ("img2img", "inpaint", "upscale"):
            assert image is not None and inputs.image_path is not None
            result = _image_task(pipeline, task, specs, settings, image, mask, advance)
            extra["image"] = inputs.image_path.name
        elif task == "semantic":
            assert label_map is not None and inputs.map_path is not None
            result = pipeline.semantic2img(specs, settings, [label_map] * options.n, progress=advance)
            extra["map"] = inputs.map_path.name
        else:
            result = pipeline.unconditional(specs, settings, progress=advance)
    items = [{"seed": spec.seed, "guidance_scale": spec.guidance_scale if task != "unconditional" else 1.0,
              "task": task, **extra} for spec in specs]
    return _save(result, settings, options, items, [_output_path(out_file, None, 0, k, options.n)
                                                    for k in range(options.n)])


def _layout(model: LatentDiffusion, data: object) -> list[Box]:
    conditioner = model.config.conditioner
    if conditioner is None or conditioner.max_boxes is None:
        raise UnsupportedTask(f"model {model.config.name!r} is not a layout-to-image model")
    return parse_layout(data, conditioner.class_names, conditioner.n_classes, conditioner.max_boxes)


def _read_map(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--map {path}: not a readable image ({err})") from None


def _image_task(pipeline: Pipeline, task: Task, specs: list[SampleSpec], settings: RunSettings, image: Image.Image,
                mask: Image.Image | None, progress: Progress) -> GenerationResult:
    """img2img, inpaint (with its mask) or upscale of one input image, once per spec."""
    images = [image] * len(specs)
    if task == "img2img":
        return pipeline.img2img(specs, settings, images, progress=progress)
    if task == "inpaint":
        assert mask is not None
        return pipeline.inpaint(specs, settings, images, [mask] * len(specs), progress=progress)
    return pipeline.upscale(specs, settings, images, progress=progress)


def _read_image(path: Path, flag: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{flag} {path}: not a readable image ({err})") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--layout {path}: not valid JSON ({err})") from None
