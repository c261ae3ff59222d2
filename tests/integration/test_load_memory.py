"""Loading a model holds one copy of its weights: the peak resident set of a fresh process that loads a
~400 MB random SD-v1-structured model grows by at most the loaded weights' bytes plus 15 % of the file's
over what the same process held after its imports, for a diffusers folder, a single .safetensors file, a
.ckpt, and an fp16 load of the fp32 file (no fp32 copy of the whole model on the way).

Each load runs in its own process, since a process's peak (VmHWM) never goes down; the files are
written once, the diffusers folder by diffusers itself.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.autoencoder import AutoencoderConfig
from models.conditioners import ConditionerConfig
from models.config import builtin_config
from models.ldm import LatentDiffusion
from models.text.clip import CLIPTextConfig
from models.tokenizers import CLIPTokenizer
from tests.helpers import original_checkpoint, save_diffusers_folder, write_clip_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = 0.15

#: run in a fresh interpreter: import what loading needs, note the peak, load, print both peaks (bytes)
PROBE = """
import json, sys
from pathlib import Path
import torch
from models.checkpoints import load_model

def peak():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

before = peak()
model = load_model(sys.argv[1], tokenizer_dir=sys.argv[2], dtype=getattr(torch, sys.argv[3]))
tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "after": peak(), "tensors": tensors}))
"""


@dataclasses.dataclass(frozen=True)
class Files:
    folder: Path
    single: Path
    ckpt: Path
    tokenizer: Path
    nbytes: int


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """SD v1's structure at a third of its width (UNet 96 channels, VAE 64, a 4-layer 256-wide CLIP)."""
    tmp = tmp_path_factory.mktemp("mid")
    tokenizer = write_clip_tokenizer(tmp / "tokenizer")
    base = builtin_config("sd-v1")
    config = dataclasses.replace(
        base, name="mid",
        unet=dataclasses.replace(base.unet, model_channels=96, context_dim=256),
        autoencoder=AutoencoderConfig(ch=64, ch_mult=(1, 2, 4, 4), num_res_blocks=2),
        conditioner=ConditionerConfig(kind="clip", clip=CLIPTextConfig(
            vocab_size=CLIPTokenizer.from_dir(tokenizer).vocab_size, hidden_size=256, intermediate_size=1024,
            num_layers=4, num_heads=4)),
    )
    with torch.device("meta"):
        model = LatentDiffusion(config)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    checkpoint = original_checkpoint(model)
    del model
    single = tmp / "mid.safetensors"
    save_file(checkpoint, str(single))
    ckpt = tmp / "mid.ckpt"
    torch.save({"state_dict": checkpoint}, ckpt)
    folder = save_diffusers_folder(checkpoint, config, tokenizer, tmp / "mid-folder")
    loaded = {k: v for k, v in checkpoint.items() if k != "betas" and "position_ids" not in k}  # what a model keeps
    nbytes = sum(v.numel() * v.element_size() for v in loaded.values())
    return Files(folder, single, ckpt, tokenizer, nbytes)


def load_peak(source: Path, tokenizer: Path, dtype: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(source), str(tokenizer), dtype], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("which", "dtype"), [("folder", "float32"), ("single", "float32"), ("ckpt", "float32"),
                                              ("single", "float16")])
def test_loading_holds_one_copy_of_the_weights(files: Files, which: str, dtype: str) -> None:
    probe = load_peak(getattr(files, which), files.tokenizer, dtype)
    expected = files.nbytes // (2 if dtype == "float16" else 1)
    assert abs(probe["tensors"] - expected) <= 0.01 * expected  # the model holds what the file holds, in dtype
    grown = probe["after"] - probe["before"]
    # the slack is 15 % of the file's fp32 bytes (code pages, module objects, the tokenizer): a second copy
    # of the weights, or an fp32 copy of an fp16 load, would exceed it several times over
    assert grown <= probe["tensors"] + ALLOWED * files.nbytes, (
        f"loading {which} as {dtype}: peak grew {grown / 2**20:.0f} MiB for {probe['tensors'] / 2**20:.0f} MiB of "
        f"weights ({grown / probe['tensors']:.2f}x)")
