"""The CPU opt-in modes of bench/model_bench.py (`--opt-ins`): how each is made from an fp32 model, and its
measured difference from the default fp32 path in pixels.

- `bf16`: the model converted to bfloat16 (`ldm generate --dtype bf16`, `LDM_WORKER_DTYPE=bf16`), then the
  usual CPU optimisation; on CPUs with AVX512-BF16 / AMX oneDNN runs its convolutions and matmuls there.
- `compiled`: the fp32 UNet through `torch.compile` with freezing (models/cpu_inference.compile_unet_for_cpu).

Quality: the same whole generations (prompts, seeds, DPM-Solver++ 20 steps, CFG 7.5) in fp32 and in the
mode, the decoded images compared pixel by pixel in /255 units (mean and max |difference| over pixels and
channels). On two models: the reduced-width SD v1 parity model of tests/integration/test_sd_parity.py
(random weights; a random UNet amplifies rounding, so this is a pessimistic figure) and the shipped,
trained tiny-shapes model (models/zoo/tiny-shapes).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from models.cpu_inference import compile_unet_for_cpu, optimize_for_cpu_inference
from models.ldm import LatentDiffusion
from models.pipeline import Pipeline, RunSettings, SampleSpec

T = TypeVar("T")
Mode = Literal["bf16", "compiled"]
MODES: tuple[Mode, ...] = ("bf16", "compiled")
QUALITY_PROMPTS = ["a red circle on the left", "a blue square", "a green triangle at the top"]


def prepared_unet(eager_unet: nn.Module, mode: Mode | None) -> nn.Module:
    """A copy of an fp32, not yet optimized UNet, set up for `mode` (None: the default fp32 CPU path)."""
    unet = copy.deepcopy(eager_unet)
    if mode == "bf16":
        return optimize_for_cpu_inference(unet.to(torch.bfloat16))
    return compile_unet_for_cpu(unet) if mode == "compiled" else optimize_for_cpu_inference(unet)


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_cost(prepare: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """`prepare()` and what it cost this process: the resident memory it left held and its peak above the start
    (the kernel's peak counter is reset first through /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_gib("VmRSS")
    result = prepare()
    return result, {"held_gib": round(_status_gib("VmRSS") - before, 2),
                    "peak_extra_gib": round(_status_gib("VmHWM") - before, 2)}


def prepared_model(load: Any, mode: Mode | None) -> LatentDiffusion:
    """`load(dtype)`'s model set up for `mode` (None: the default fp32 CPU path)."""
    model: LatentDiffusion = load(torch.bfloat16 if mode == "bf16" else torch.float32)
    if mode == "compiled":
        optimize_for_cpu_inference(model.autoencoder)
        compile_unet_for_cpu(model)
    else:
        optimize_for_cpu_inference(model)
    return model


def _images(model: LatentDiffusion, size: int) -> np.ndarray:
    specs = [SampleSpec(p, seed=i, guidance_scale=7.5) for i, p in enumerate(QUALITY_PROMPTS)]
    with torch.inference_mode():
        images = Pipeline(model, optimize=False).txt2img(specs, RunSettings("dpmpp_2m", 20, size, size)).images
    return np.stack([np.asarray(im).astype(np.int16) for im in images])


def quality(load: Any, size: int, modes: tuple[Mode, ...] = MODES) -> dict[str, dict[str, float]]:
    """{mode: {mean_abs_255, max_abs_255}} of `load(dtype)` (a fresh LatentDiffusion each call) against fp32."""
    reference = _images(prepared_model(load, None), size)
    out = {}
    for mode in modes:
        diff = np.abs(_images(prepared_model(load, mode), size) - reference)
        out[mode] = {"mean_abs_255": round(float(diff.mean()), 3), "max_abs_255": int(diff.max())}
    return out


def quality_models(size_parity: int = 256, modes: tuple[Mode, ...] = MODES) -> dict[str, Any]:
    """Quality of `modes` on the parity model (at `size_parity` px) and on tiny-shapes (at its 64 px)."""
    from models.checkpoints import load_model
    from models.tokenizers import CLIPTokenizer
    from tests.helpers import write_clip_tokenizer
    from tests.integration.test_sd_parity import sd_config, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "tokenizer")
        path = Path(tmp) / "parity.safetensors"
        write_checkpoint(sd_config(CLIPTokenizer.from_dir(tok).vocab_size), path)
        parity = quality(lambda dtype: load_model(path, tokenizer_dir=tok, dtype=dtype).eval(), size_parity, modes)
    shapes = quality(lambda dtype: load_model("tiny-shapes", dtype=dtype).eval(), 64, modes)
    return {"parity_model": {"size_px": size_parity, "modes": parity},
            "tiny_shapes": {"size_px": 64, "modes": shapes},
            "setup": f"{len(QUALITY_PROMPTS)} prompts, seeds 0-{len(QUALITY_PROMPTS) - 1}, DPM-Solver++ 20 steps, "
                     "CFG 7.5"}
