"""LoRA adapters, applied unmerged and per sample, so one batch can mix adapter sets and weights.

A LoRA changes a layer W into W + w * (alpha / rank) * up @ down (Hu et al. 2021; kohya's `alpha` per
module, `w` the weight a request gives). We never merge it: the base layer runs as it is and each
sample's low-rank term is added to that sample's output, `y_i = W x_i + up_s (down_s x_i)` for the set s
of adapters sample i asked for (their ranks concatenated, `w * alpha / rank` folded into `up`). Samples
are grouped by adapter set and each group runs as one batched product over its items (the segmented
GEMM of Punica / S-LoRA, in plain torch); an item's arithmetic does not depend on the rest of the batch,
so an image with adapters is the same alone or in any batch, and the base weights never change (no
drift, nothing to undo between requests).

Files: kohya / AUTOMATIC1111 `.safetensors` (`lora_unet_*`, `lora_te_*`, with `.lora_down.weight`,
`.lora_up.weight` and an optional `.alpha` per module; UNet names in the diffusers or the original
layout, the latter being what kohya's SDXL LoRAs use; SDXL's text encoders as `lora_te1_*` (CLIP ViT-L) and
`lora_te2_*` (OpenCLIP bigG, its `text_projection` included); LoCon conv layers: a kxk `lora_down` conv
followed by a 1x1 `lora_up` conv), and diffusers / PEFT files (`unet.<module>.lora_A.weight` /
`.lora_B.weight`, or `.lora.down` / `.lora.up`, `text_encoder.*` and SDXL's `text_encoder_2.*`; alpha from
`.alpha` keys or the `lora_adapter_metadata`). Every key must name a layer of the model: a LoRA made for
another architecture, or of a kind we do not apply (DoRA, LoHa, LoKr, CP-decomposed LoCon), is refused
by name rather than half-applied.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints import read_state_dict
from models.cpu_inference import PackedConv2d
from models.diffusers_layout import unet_key_map
from models.layers import batch_invariant_linear
from models.ldm import LatentDiffusion
from models.text.sdxl import SDXLTextConditioner
from models.winograd import WinogradConv2d


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and the keys."""


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted layer: down [r, in] (conv: [r, in, kh, kw]), up [out, r] (conv: [out, r, 1, 1]),
    scale = alpha / r."""

    down: Tensor
    up: Tensor
    scale: float


@dataclass(frozen=True, eq=False)
class LoRA:
    """A loaded adapter: its layers by our module path (`unet.<...>` / `conditioner.<...>`). Compared by
    identity: two loads of one file are two adapters."""

    name: str
    layers: dict[str, LoraLayer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.down, layer.up))


#: one sample's adapters and their weights
AdapterSet = tuple[tuple[LoRA, float], ...]

_KOHYA = re.compile(r"(lora_(?:unet|te|te1|te2)_\w+)\.(.+)")
_PEFT = re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight"
                   r"|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)")
_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight")


def _is_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d | PackedConv2d | WinogradConv2d)


def target_names(model: LatentDiffusion) -> dict[str, str]:
    """Every name a LoRA file may give one of the model's layers -> our module path.

    UNet layers: kohya's `lora_unet_` + the diffusers path with `_` for `.` (SD 1/2 LoRAs) or + the
    original path (SGM-style files, kohya's SDXL LoRAs), and PEFT's `unet.` + the diffusers path. Text encoder
    layers (HF CLIP names): kohya's prefix + path with `_`, and PEFT's prefix + `.` + path (with or without
    `text_model.`), the prefixes of `_text_encoders`."""
    names: dict[str, str] = {}
    unet_paths = [p for p, m in model.unet.named_modules() if _is_target(m)]
    diffusers = unet_key_map([p + ".weight" for p in unet_paths], model.config.unet)
    for path in unet_paths:
        theirs = diffusers[path + ".weight"].removesuffix(".weight")
        ours = "unet." + path
        names["lora_unet_" + theirs.replace(".", "_")] = ours
        names["lora_unet_" + path.replace(".", "_")] = ours
        names["unet." + theirs] = ours
    for root, kohya, peft in _text_encoders(model):
        for path, module in model.get_submodule(root).named_modules():
            hf = path.removeprefix("transformer.")  # HF's CLIPTextModel(WithProjection) name
            if _is_target(module) and (path.startswith("transformer.text_model.") or path == "text_projection"):
                ours = f"{root}.{path}"
                for prefix in kohya:
                    names[prefix + hf.replace(".", "_")] = ours
                names[f"{peft}.{hf}"] = ours
                names[f"{peft}.{hf.removeprefix('text_model.')}"] = ours  # as transformers >= 5 names it
    return names


def _text_encoders(model: LatentDiffusion) -> list[tuple[str, tuple[str, ...], str]]:
    """(module path, kohya prefixes, diffusers/PEFT prefix) of each CLIP text encoder of the model. SD 1/2: one,
    `lora_te_` / `text_encoder`. SDXL: CLIP ViT-L is kohya's `lora_te1_` (and `lora_te_`, which diffusers reads as
    the first encoder too) / `text_encoder`, bigG `lora_te2_` / `text_encoder_2`; the refiner has bigG alone."""
    conditioner = model.conditioner
    if isinstance(conditioner, SDXLTextConditioner):
        known = [(("lora_te1_", "lora_te_"), "text_encoder"), (("lora_te2_",), "text_encoder_2")]
        mine = known[-len(conditioner.embedders):]
        return [(f"conditioner.embedders.{i}", kohya, peft) for i, (kohya, peft) in enumerate(mine)]
    if conditioner is not None and hasattr(conditioner, "transformer"):
        return [("conditioner", ("lora_te_",), "text_encoder")]
    return []


def _split_key(key: str) -> tuple[str, str]:
    """(module name as the file gives it, what the tensor is: lora_down.weight, alpha, ...)."""
    if m := _PEFT.fullmatch(key):
        return f"{m[1]}.{m[2]}", m[3]
    if m := _KOHYA.fullmatch(key):
        return m[1], m[2]
    raise LoraError(f"key {key!r} is neither kohya's (lora_unet_* / lora_te_* / lora_te1_* / lora_te2_*) nor "
                    "diffusers/PEFT's (unet.* / text_encoder.* / text_encoder_2.* with lora_A / lora_B)")


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata`: the PEFT LoraConfig of each component, by prefix."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    flat: dict[str, Any] = json.loads(raw)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        prefix, _, field = key.partition(".")
        configs.setdefault(prefix, {})[field] = value
    for prefix, config in configs.items():
        for field in ("use_dora", "use_rslora"):
            if config.get(field):
                raise LoraError(f"lora_adapter_metadata: {prefix}.{field} is not supported")
    return configs


def _alpha(module: str, tensors: dict[str, Tensor], rank: int, peft: dict[str, dict[str, Any]]) -> float:
    """A module's alpha: its `.alpha` tensor; else, for a PEFT file with metadata, PEFT's rule (the first
    `alpha_pattern` key matching the end of the module's name, else `lora_alpha`); else the rank (scale 1,
    kohya's and PEFT's default)."""
    if "alpha" in tensors:
        return float(tensors["alpha"])
    prefix, _, name = module.partition(".")
    config = peft.get(prefix) if prefix in ("unet", "text_encoder", "text_encoder_2") else None
    if config is None:
        return float(rank)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def load_lora(path: str | Path, model: LatentDiffusion, names: dict[str, str] | None = None) -> LoRA:
    """Read a LoRA file for `model` (see the module docstring for the layouts). Tensors stay on the CPU in
    fp32 until a batch uses them. `names`: `target_names(model)`, when the caller keeps it."""
    path = Path(path)
    sd, metadata = read_state_dict(path)
    try:
        return _parse(path.stem, sd, metadata, model, names or target_names(model))
    except LoraError as err:
        raise LoraError(f"{path}: {err}") from None


def _parse(name: str, sd: dict[str, Tensor], metadata: dict[str, str], model: LatentDiffusion,
           names: dict[str, str]) -> LoRA:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        module, kind = _split_key(key)
        if kind not in (*_DOWN, *_UP, "alpha"):
            raise LoraError(f"{key}: {kind!r} tensors (DoRA, LoHa, LoKr or CP-decomposed LoCon) are not supported")
        modules.setdefault(module, {})[kind] = tensor
    unknown = sorted(m for m in modules if m not in names)
    if unknown:
        raise LoraError(f"{len(unknown)} adapted layers the model does not have (a LoRA for another "
                        f"architecture?): {unknown[:6]}")
    peft = _peft_configs(metadata)
    layers = {}
    for module, tensors in modules.items():
        down = next((tensors[k] for k in _DOWN if k in tensors), None)
        up = next((tensors[k] for k in _UP if k in tensors), None)
        if down is None or up is None:
            raise LoraError(f"{module}: needs both a down and an up matrix, has {sorted(tensors)}")
        scale = _alpha(module, tensors, down.shape[0], peft) / down.shape[0]
        path = names[module]
        if path in layers:
            raise LoraError(f"{module}: a second set of matrices for layer {path} (under another name)")
        layers[path] = _checked(module, down.float(), up.float(), scale, _module(model, path))
    return LoRA(name=name, layers=layers)


def _module(model: LatentDiffusion, path: str) -> nn.Module:
    return model.get_submodule(path)


def _shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a target layer ((), for a Linear)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    assert isinstance(module, PackedConv2d | WinogradConv2d)
    return module.out_channels, module.in_channels, module.kernel_size


def _checked(name: str, down: Tensor, up: Tensor, scale: float, module: nn.Module) -> LoraLayer:
    """Shapes against the layer; 1x1 conv adapters of a Linear (kohya's SD 1 proj_in on SD 2) and the
    reverse are reshaped, since a 1x1 conv and a Linear are the same product."""
    out_f, in_f, kernel = _shape(module)
    if not kernel and down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4:
        down, up = down.flatten(1), up.flatten(1)
    if kernel and down.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    rank = down.shape[0]
    want_down = (rank, in_f, *kernel)
    want_up = (out_f, rank, *((1, 1) if kernel else ()))
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise LoraError(f"{name}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer "
                        f"(expected {want_down} / {want_up})")
    return LoraLayer(down=down.contiguous(), up=up.contiguous(), scale=scale)


# ---------------------------------------------------------------------------------------------- applying


@dataclass(frozen=True, eq=False)
class _Group:
    """Samples sharing one layer's adapters: their indices, the concatenated down and the scaled up."""

    runs: list[tuple[int, int]]  # the samples, as [start, stop) runs of consecutive indices
    down: Tensor
    up: Tensor


def _groups(path: str, per_sample: Sequence[AdapterSet], like: Tensor) -> list[_Group]:
    sets: dict[tuple[tuple[int, float], ...], list[int]] = {}
    adapters: dict[tuple[tuple[int, float], ...], list[tuple[LoraLayer, float]]] = {}
    for i, adapter_set in enumerate(per_sample):
        here = [(lora.layers[path], weight) for lora, weight in adapter_set if path in lora.layers and weight != 0]
        if here:
            key = tuple((id(layer), weight) for layer, weight in here)
            sets.setdefault(key, []).append(i)
            adapters[key] = here
    groups = []
    for key, rows in sets.items():
        here = adapters[key]
        down = torch.cat([layer.down for layer, _ in here])
        up = torch.cat([layer.up * (weight * layer.scale) for layer, weight in here], dim=1)
        groups.append(_Group(_runs(rows), down.to(like.device, like.dtype), up.to(like.device, like.dtype)))
    return groups


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, stop) runs: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[tuple[int, int]] = []
    for i in rows:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _add_low_rank(module: nn.Module, x: Tensor, out: Tensor, down: Tensor, up: Tensor) -> None:
    """out += up (down x) for a run of items, in place: per-item batched products (models/layers.py); for a
    conv layer, its kxk conv with `down`, then `up` (a 1x1 conv) as a matmul over channels."""
    if down.ndim == 2:
        out += batch_invariant_linear(batch_invariant_linear(x, down), up).to(out.dtype)
        return
    if x.ndim == 3:  # a 1x1 conv applied to [N, L, C] tokens as a matmul (SpatialTransformer's _pointwise)
        out += batch_invariant_linear(batch_invariant_linear(x, down.flatten(1)), up.flatten(1)).to(out.dtype)
        return
    stride, padding, dilation = (tuple(getattr(module, a)) for a in ("stride", "padding", "dilation"))
    for i in range(x.shape[0]):
        # one item at a time: oneDNN picks a conv kernel by batch size and memory format (a 1-item slice of a
        # channels_last batch is also "contiguous"), so a folded call would round an item by its company
        h = F.conv2d(x[i : i + 1], down, None, stride, padding, dilation)  # [1, r, H', W']
        delta = batch_invariant_linear(h.permute(0, 2, 3, 1), up.flatten(1)).permute(0, 3, 1, 2)
        out[i : i + 1] += delta.to(out.dtype)


@contextmanager
def adapters_applied(model: LatentDiffusion, per_sample: Sequence[AdapterSet]) -> Iterator[None]:
    """Within the block, every forward of the model's adapted layers adds each sample's low-rank terms.

    `per_sample` holds one adapter set per sample of the batch the caller runs. A layer may see that
    batch repeated (classifier-free guidance runs [uncond; cond]): a batch of k * N rows takes sample
    i's adapters for rows i, N + i, ... The hooks are removed on exit, so nothing outlives the batch."""
    paths = sorted({p for adapter_set in per_sample for lora, _ in adapter_set for p in lora.layers})
    if not paths:
        yield
        return
    n = len(per_sample)
    like = next(model.unet.parameters())
    handles = []
    try:
        for path in paths:
            groups = _groups(path, per_sample, like)
            if groups:
                module = _module(model, path)
                handles.append(module.register_forward_hook(_hook(groups, n)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(groups: list[_Group], n: int) -> Any:
    def add_low_rank(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} rows for adapters given for {n} samples")
        for offset in range(0, x.shape[0], n):
            for group in groups:
                for start, stop in group.runs:
                    # slices and an in-place add: no gather/scatter copies, and the output keeps its memory
                    # format (channels_last), so the next layers choose the same kernels with or without adapters
                    rows = slice(offset + start, offset + stop)
                    _add_low_rank(module, x[rows], output[rows], group.down, group.up)
        return output

    return add_low_rank


# ---------------------------------------------------------------------------------------------- caching


class LoraCache:
    """Loaded adapters by file, least recently used evicted first, at most `max_bytes` of tensors held.

    A file is re-read when it changed (size or mtime). A request that holds an evicted adapter keeps it
    alive until it finishes; the cache only stops holding it."""

    def __init__(self, model: LatentDiffusion, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.model = model
        self.names = target_names(model)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int, int], LoRA] = OrderedDict()
        self._nbytes = 0  # kept as a running total, so another thread (a metrics scrape) may read it at any time
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the adapters held."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str | Path) -> LoRA:
        resolved = Path(path).resolve()
        if not resolved.is_file():
            raise LoraError(f"{path}: no such LoRA file")
        stat = resolved.stat()
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        lora = load_lora(resolved, self.model, self.names)
        size = lora.nbytes
        if size > self.max_bytes:
            raise LoraError(f"{path}: {size} bytes of adapter, over the cache's {self.max_bytes}")
        for stale in [k for k in self._entries if k[0] == key[0]]:  # an older version of the same file
            self._nbytes -= self._entries.pop(stale).nbytes
        while self._entries and self._nbytes + size > self.max_bytes:  # room first: the total never exceeds the
            self._nbytes -= self._entries.popitem(last=False)[1].nbytes  # bound, even read mid-way by a scrape
        self._entries[key] = lora
        self._nbytes += size
        return lora


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` (the CLI's --lora) -> (path, weight); weight 1.0 when none is given."""
    path, sep, weight = arg.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return arg, 1.0
