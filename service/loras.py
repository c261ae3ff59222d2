"""LoRA adapters asked for by requests: their names, where they are found, and AUTOMATIC1111's prompt tags.

Torch-free, so that the front ends can refuse an unknown adapter with a 422 before a job is queued; the worker
resolves the same names the same way (service/worker/runner.py) and loads the files through its bounded cache
(models/lora.py `LoraCache`).

A request never gives a path: a name is a file stem in the server's `LDM_LORA_DIR` (`style` ->
`<dir>/style.safetensors`), of letters, digits and `._- ` only, so `..`, `/` and `\\` cannot reach outside it,
and the file it resolves to (symbolic links followed) must still be inside the folder.

AUTOMATIC1111 asks for adapters in the prompt: `<lora:name:weight>` (weight 1 when left out). With the A1111
prompt syntax (`LDM_PROMPT_SYNTAX=a1111`) admission moves those tags out of the prompt into `loras`; a tag of
another kind of extra network (`<hypernet:...>`, `<lyco:...>`) or with A1111's separate text-encoder and UNet
weights (`<lora:name:0.8:0.5>`) is refused by name rather than drawn as text.
"""

from __future__ import annotations

import re
from pathlib import Path

LORA_SUFFIX = ".safetensors"
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$"
_NAME = re.compile(LORA_NAME_PATTERN)
#: A1111's extra-network tag (modules/extra_networks.py `re_extra_net`): <kind:arguments>
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


class LoraNameError(ValueError):
    """A LoRA name that is not a plain name, or that names no file of the folder; the message says which."""


def lora_path(folder: Path | None, name: str) -> Path:
    """The file of adapter `name` in `folder` (LDM_LORA_DIR). LoraNameError when there is no folder, the name is
    not a plain name, or no such file is inside the folder."""
    if folder is None:
        raise LoraNameError(f"LoRA {name!r}: this server has no LoRA folder (LDM_LORA_DIR is unset)")
    if not _NAME.match(name) or ".." in name:
        raise LoraNameError(f"LoRA {name!r} is not a name: use a file stem of the LoRA folder (letters, digits, "
                            "'._- '), never a path")
    root = folder.resolve()
    path = (root / (name + LORA_SUFFIX)).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise LoraNameError(f"unknown LoRA {name!r}: no {name}{LORA_SUFFIX} in the server's LoRA folder")
    return path


def available_loras(folder: Path | None) -> list[str]:
    """The names a request may use (the folder's `*.safetensors` stems), sorted."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*" + LORA_SUFFIX) if _NAME.match(p.stem) and ".." not in p.stem)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:name[:weight]>` tags taken out of a prompt: (the prompt without them, [(name, weight)]).

    As A1111 does, each tag is removed from the text (what surrounds it stays as it was). ValueError naming the
    tag for another kind of extra network, separate text-encoder/UNet weights, or a weight that is not a number."""
    loras: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match[1], match[2].split(":")
        if kind != "lora":
            raise ValueError(f"prompt tag {match[0]!r}: only <lora:name:weight> extra networks are supported")
        if len(args) > 2:
            raise ValueError(f"prompt tag {match[0]!r}: separate text-encoder and UNet weights are not supported; "
                             "give one weight, <lora:name:weight>")
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise ValueError(f"prompt tag {match[0]!r}: the weight {args[1]!r} is not a number") from None
        loras.append((args[0].strip(), weight))
        return ""

    return EXTRA_NETWORK_TAG.sub(take, prompt), loras
