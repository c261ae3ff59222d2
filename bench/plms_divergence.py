"""Where PLMS leaves DDIM's path on the shipped tiny-shapes model (the figures of its model card).

For the first --n prompts of `ldm eval` (prompt i with seed i, guidance 7.5), runs DDIM and PLMS at --steps from
the same noise and prints, per prompt, the largest latent difference at the end, and for the prompts where
PLMS diverges (final difference above 1) the difference after every step and the std of the guided noise
prediction PLMS was given at every model call. Not a test.

    python bench/plms_divergence.py [--n 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import load_model  # noqa: E402
from models.eval.prompts import random_prompts  # noqa: E402
from models.guidance import guided_eps  # noqa: E402
from models.noise import generators_from_seeds, randn_per_item  # noqa: E402
from models.pipeline import Pipeline, SampleSpec  # noqa: E402
from models.samplers import sample, sampling_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="prompts (default 16)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()
    model = load_model("tiny-shapes")
    prompts = random_prompts(args.n, 0)
    specs = [SampleSpec(p, "", i, args.guidance) for i, p in enumerate(prompts)]
    cond, uncond, _ = Pipeline(model)._conditioning(specs, None, (64, 64))
    guided = guided_eps(model.unet, model.schedule, cond, uncond, torch.full((len(specs),), args.guidance))
    seeds = [s.seed for s in specs]
    noise = randn_per_item((len(specs), model.config.latent_channels, 16, 16), generators_from_seeds(seeds),
                           device="cpu", dtype=torch.float32)
    paths: dict[str, list[torch.Tensor]] = {"plms": [], "ddim": []}
    eps_std: list[torch.Tensor] = []

    def plms_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = guided(x, t)
        eps_std.append(eps.flatten(1).std(dim=1))
        return eps

    for name, eps_fn in (("plms", plms_eps), ("ddim", guided)):
        sample(name, eps_fn, noise.clone(), sampling_plan(name, model.schedule, args.steps),  # type: ignore[arg-type]
               generators=generators_from_seeds(seeds), callback=lambda i, x, n=name: paths[n].append(x.clone()))
    diffs = torch.stack([(p - d).flatten(1).abs().amax(dim=1) for p, d in zip(paths["plms"], paths["ddim"],
                                                                              strict=True)])  # [steps, N]
    stds = torch.stack(eps_std)  # [model calls, N]
    print(f"tiny-shapes, {args.steps} steps, guidance {args.guidance}: max |PLMS - DDIM| in the latent")
    for i, prompt in enumerate(prompts):
        print(f"{diffs[-1, i]:6.2f}  {prompt}")
        if diffs[-1, i] > 1:
            print("        after each step:", " ".join(f"{v:.2f}" for v in diffs[:, i].tolist()))
            print("        guided eps std: ", " ".join(f"{v:.1f}" for v in stds[:, i].tolist()))


if __name__ == "__main__":
    main()
