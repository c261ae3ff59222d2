"""The paper's central claim at small scale (its Fig. 6-7): class-conditional diffusion in pixel space (f=1)
against LDMs in the latent spaces of f = 2, 4, 8, 16, 32 autoencoders of the shapes data, each given the same
training compute, compared on Fréchet distance, the judge's class accuracy, training samples/s and sampling
images/s. One line per factor in the plot: quality against compute, like the paper's Fig. 6.

Equal compute, resumable: every factor's training rate (samples/s of one forward + backward + AdamW step of
its UNet at the study's batch) is measured once at the start, on a quiet machine, and stored. A compute
milestone of S seconds then gives factor f `round(S * rate_f / batch)` steps: equal seconds of this machine,
fixed as step counts in the state file, so a study that is cut (a session's end, a busy machine) and run
again continues from its checkpoints and trains exactly what an uninterrupted one would. Milestones run
round-robin (every factor to the first, evaluated; then every factor to the second...), so a cut study
still holds complete rows at each compute level it finished. Raising the last milestone later extends it, and a
factor named later in `--factors` joins it (its rate measured then; the table and plot hold every factor run).

Every model uses one UNet design (the tiny-shapes UNet at `--width` channels, 1.7M parameters at the default
32, so a 2-core CPU runs the study; input/output channels follow the latent) and one recipe. The f >= 2
autoencoders are trained here first with one recipe (the shipped tiny-shapes first stage's, no GAN); their
time is reported and not charged to the diffusion budget, as in the paper, where first stages are trained
once and reused. Each first stage's reconstructions of the held-out scenes are judged too (the table's
"reconstructions" column): near what a perfect diffusion model in its latent space would score. The default 400-step
first stages cap f >= 4 there; `--ae-steps 1600 --ae-decay-from 800` lets every class through at f=2 and f=4
(docs/training.md). Writes bench/results/latent_factor.json (table and rows) and docs/latent_factor.png.

    python bench/latent_factor_bench.py                                   # milestones 150,300,600 s
    python bench/latent_factor_bench.py --milestones 150,300,600,1200     # later: extends the same study
    python bench/latent_factor_bench.py --ae-steps 1600 --ae-decay-from 800 --work runs/lf-strong \\
        --out bench/results/latent_factor_strong.json --plot docs/latent_factor_strong.png
    python3 bench/latent_factor_bench.py --device cuda --batch-size 256 ...  # on a GPU: bench/device/README.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_io import publish  # noqa: E402
from models.autoencoder import Autoencoder  # noqa: E402
from models.train.autoencoder_trainer import (  # noqa: E402
    AutoencoderTrainConfig,
    AutoencoderTrainer,
    load_first_stage,
)
from models.train.common import load_train_config  # noqa: E402
from models.train.ldm_trainer import LDMTrainConfig, LDMTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: f -> (encoder/decoder channel multipliers, latent channels): the shipped f=4 first stage's design, one
#: level per factor of 2; latent channels grow with f as in the paper's kl-f* models (f32: 64 numbers/image)
FIRST_STAGES: dict[int, tuple[tuple[int, ...], int]] = {
    2: ((1, 2), 3), 4: ((1, 2, 2), 3), 8: ((1, 2, 2, 4), 4), 16: ((1, 2, 2, 4, 4), 8), 32: ((1, 2, 2, 4, 4, 4), 16),
}
LDM_CONFIG = ROOT / "models" / "train" / "configs" / "shapes-class.yaml"
AE_CONFIG = ROOT / "models" / "train" / "configs" / "tiny-shapes-autoencoder.yaml"
SAMPLER = "euler_a"  # shapes-class's default sampler (its model card)


def latent_channels(f: int) -> int:
    return 3 if f == 1 else FIRST_STAGES[f][1]


def latent_shape(f: int) -> str:
    return f"{64 // f}x{64 // f}x{latent_channels(f)}"


def ldm_config(f: int, autoencoder: str, args: argparse.Namespace) -> LDMTrainConfig:
    """The study's recipe for factor f; its steps are set per milestone."""
    base = load_train_config(LDMTrainConfig, LDM_CONFIG)
    c = latent_channels(f)
    return replace(
        base, name=f"latent-factor-f{f}", description=f"latent factor study: f={f}", autoencoder_path=autoencoder,
        export_autoencoder_path=None, unet=replace(base.unet, in_channels=c, out_channels=c, model_channels=args.width),
        batch_size=args.batch_size, lr=args.lr, warmup_steps=100, latent_pool=args.pool, scale_images=512,
        checkpoint_every=100, sample_every=10**9, log_every=25, seed=0, device=args.device,
    )


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two invocations the same study (a resumed one must match the stored setup). The factors are
    not part of it: each factor's runs stand alone, so a factor can join a study later (`load_state`)."""
    setup = {"width": args.width, "batch_size": args.batch_size, "lr": args.lr,
             "pool": args.pool, "ae_steps": args.ae_steps,
             "ae_lr_decay_start": args.ae_decay_from, "task": "class", "n_eval": args.n,
             "sampler": SAMPLER, "sample_steps": args.steps, "threads": torch.get_num_threads()}
    if args.device != "cpu":  # CPU studies carry no device key (the committed one predates it)
        setup["device"] = torch.cuda.get_device_name(args.device)
    return setup


def first_stage(f: int, args: argparse.Namespace, state: dict[str, Any]) -> str:
    """autoencoder_path for factor f's LDM trainer (trained here once; resumed from its checkpoint)."""
    if f == 1:
        return "pixel"
    run = args.work / f"ae-f{f}"
    path = run / "autoencoder.safetensors"
    if str(f) in state["first_stages"]:
        return str(path)
    base = load_train_config(AutoencoderTrainConfig, AE_CONFIG)
    mult, channels = FIRST_STAGES[f]
    config = replace(base, autoencoder=replace(base.autoencoder, ch_mult=mult, z_channels=channels,
                                               embed_dim=channels),
                     steps=args.ae_steps, disc_start=10**9, eval_every=args.ae_steps, sample_every=args.ae_steps,
                     eval_images=64, lr_decay_start=args.ae_decay_from, device=args.device)
    started = time.monotonic()
    metrics = AutoencoderTrainer(config, run).train()
    state["first_stages"][str(f)] = {"psnr": metrics.get("psnr"), "train_s": time.monotonic() - started,
                                     "latent": latent_shape(f)}
    return str(path)


def first_stage_ceiling(autoencoder: Autoencoder, args: argparse.Namespace) -> dict[str, float | None]:
    """The judge's class accuracy and Fréchet distance on the first stage's reconstructions of the evaluation's
    held-out scenes: what a perfect diffusion model in this latent space would score, so a factor's accuracy is
    read against what its first stage lets through (pixels: the real renders, 100 %)."""
    from PIL import Image

    from models.eval.conditions import evaluate_task
    from models.images import to_pil, to_tensor
    from models.train.data_shapes import Scene, render

    autoencoder = autoencoder.to(args.device).eval()

    def reconstruct(scenes: Sequence[Scene], specs: object, settings: object) -> list[Image.Image]:
        with torch.no_grad():
            images = to_tensor([Image.fromarray(render(s)) for s in scenes]).to(args.device)
            return to_pil(autoencoder(images, sample_posterior=False).recon)

    report = evaluate_task(reconstruct, "class", args.n, progress=False)
    return {"ceiling_accuracy": report.accuracy, "ceiling_fd": report.fd}


def measure_rate(f: int, args: argparse.Namespace) -> dict[str, float]:
    """Training samples/s of factor f's UNet (forward, backward, AdamW; medians of timed steps after a warm-up)
    and its training GFLOP per sample (forward + backward, torch's FLOP counter). On CUDA under the trainer's bf16
    autocast, timed between synchronisations."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import UNet

    config = ldm_config(f, "pixel", args)
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = UNet(config.unet).to(device)
    size, c, b = 64 // f, latent_channels(f), args.batch_size
    x, t = torch.randn(b, c, size, size, device=device), torch.randint(0, 1000, (b,), device=device)
    context = torch.randn(b, 1, config.unet.context_dim or 1, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cuda = device.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = net(x, t, context=context).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as counter:
        net(x, t, context=context).square().mean().backward()
    opt.zero_grad(set_to_none=True)
    step()
    times = []
    while len(times) < 3 or (sum(times) < 8 and len(times) < 30):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = sorted(times)[len(times) // 2]
    return {"samples_per_s": b / seconds, "gflop_per_sample": counter.get_total_flops() / b / 1e9,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def train_to(f: int, steps: int, autoencoder: str, args: argparse.Namespace) -> Path:
    """Factor f's model trained to `steps` (resumed from its checkpoint) and exported with its EMA weights."""
    run = args.work / f"ldm-f{f}"
    done = run / f"model-{steps}.safetensors"
    if not done.is_file():
        LDMTrainer(replace(ldm_config(f, autoencoder, args), steps=steps), run).train()
        os.replace(run / "model.safetensors", done)
    return done


def evaluate_model(path: Path, args: argparse.Namespace, *, throughput: bool) -> dict[str, float | None]:
    """The judge's class accuracy and Fréchet distance on held-out classes (`ldm eval --task class`'s), and,
    once per factor, sampling images/s (a batch of 8 after a warm-up batch)."""
    from models.checkpoints import load_model
    from models.eval.conditions import evaluate_task
    from models.pipeline import Pipeline, RunSettings, SampleSpec

    pipeline = Pipeline(load_model(path, device=args.device))
    out: dict[str, float | None] = {}
    if throughput:
        settings = RunSettings(sampler=SAMPLER, steps=args.steps)
        specs = [SampleSpec("", "", i, 5.0) for i in range(8)]
        pipeline.class2img(specs[:2], settings, [0, 1])
        started = time.perf_counter()
        pipeline.class2img(specs, settings, list(range(8)))
        out["sample_images_per_s"] = len(specs) / (time.perf_counter() - started)
    report = evaluate_task(pipeline, "class", args.n, sampler=SAMPLER, steps=args.steps, progress=False)
    return out | {"accuracy": report.accuracy, "fd": report.fd, "fd_reference": report.fd_reference}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--milestones", default="150,300,600",
                        help="training compute per factor at which every model is evaluated (seconds of this machine)")
    parser.add_argument("--factors", default="1,2,4,8,16,32", help="downsampling factors to compare")
    parser.add_argument("--width", type=int, default=32, help="UNet model_channels (the same for every factor)")
    parser.add_argument("--ae-steps", type=int, default=400, help="training steps of each autoencoder")
    parser.add_argument("--ae-decay-from", type=int, default=None,
                        help="autoencoder step from which its learning rate falls linearly to a tenth at --ae-steps "
                             "(default: constant)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pool", type=int, default=8000, help="training images encoded once per model")
    parser.add_argument("--n", type=int, default=72, help="held-out classes drawn per evaluation")
    parser.add_argument("--steps", type=int, default=20, help=f"sampler steps ({SAMPLER})")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:N]: where every model trains and samples (a CUDA study is another study: "
                             "its rates, hence its step counts, are the card's)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "latent-factor",
                        help="checkpoints and state (git-ignored)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latent_factor.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "latent_factor.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    factors = [int(x) for x in args.factors.split(",")]
    unknown = sorted(set(factors) - {1, *FIRST_STAGES})
    if unknown:
        choices = ", ".join(map(str, FIRST_STAGES))
        parser.error(f"factors {unknown} have no first-stage design; choose from 1, {choices}")
    milestones = sorted(float(x) for x in args.milestones.split(","))
    state = load_state(args)
    for f in factors:
        if str(f) not in state["rates"]:
            state["rates"][str(f)] = measure_rate(f, args)
            save_state(args, state)
        logging.info("f=%d: %s", f, state["rates"][str(f)])
    autoencoders = {}
    for f in factors:
        autoencoders[f] = first_stage(f, args, state)
        stage = state["first_stages"].get(str(f))
        if stage is not None and "ceiling_accuracy" not in stage:
            stage |= first_stage_ceiling(load_first_stage(Path(autoencoders[f])), args)
            logging.info("f=%d first stage: %s", f, stage)
        save_state(args, state)
    for seconds in milestones:
        for f in factors:
            key = f"{f}@{seconds:g}"
            if key in state["evals"]:
                continue
            rate = state["rates"][str(f)]["samples_per_s"]
            steps = max(1, round(seconds * rate / args.batch_size))
            path = train_to(f, steps, autoencoders[f], args)
            first = not any(e["f"] == f for e in state["evals"].values())
            state["evals"][key] = {"f": f, "compute_s": seconds, "steps": steps, "samples": steps * args.batch_size,
                                   "tflop": steps * args.batch_size * state["rates"][str(f)]["gflop_per_sample"] / 1e3,
                                   **evaluate_model(path, args, throughput=first)}
            save_state(args, state)
            logging.info("%s: %s", key, state["evals"][key])
        report(state, args)
    return 0


def load_state(args: argparse.Namespace) -> dict[str, Any]:
    path = args.work / "state.json"
    setup = setup_of(args)
    if not path.is_file():
        return {"setup": setup, "rates": {}, "first_stages": {}, "evals": {}}
    state: dict[str, Any] = json.loads(path.read_text())
    stored = {k: v for k, v in state["setup"].items() if k != "factors"}  # studies begun before factors could join
    if stored != setup:
        changed = sorted(k for k in setup.keys() | stored.keys() if stored.get(k) != setup.get(k))
        raise SystemExit(f"{path} holds a study with other settings ({', '.join(changed)}): continue it with the same "
                         f"settings or give another --work")
    return state


def save_state(args: argparse.Namespace, state: dict[str, Any]) -> None:
    path = args.work / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def report(state: dict[str, Any], args: argparse.Namespace) -> None:
    """Table, JSON and plot of every finished (factor, milestone)."""
    evals = sorted(state["evals"].values(), key=lambda r: (r["compute_s"], r["f"]))
    # sampling throughput is measured at a factor's first evaluation; every row of the factor carries it
    throughput = {r["f"]: r["sample_images_per_s"] for r in evals if "sample_images_per_s" in r}
    rows = [r | {"sample_images_per_s": throughput.get(r["f"])} for r in evals]
    factors = ",".join(str(f) for f in sorted(int(k) for k in state["rates"]))  # every factor the study has run
    publish({"setup": state["setup"] | {"factors": factors}, "rates": state["rates"],
             "first_stages": state["first_stages"], "rows": rows,
             "ldm_config": asdict(ldm_config(1, "pixel", args))["unet"]},
            markdown_table(rows, state), args.out)
    plot(rows, state, args.plot)


def markdown_table(rows: list[dict[str, Any]], state: dict[str, Any]) -> str:
    header = ["f", "latent", "first stage PSNR", "reconstructions: accuracy, FD", "training samples/s",
              "GFLOP/sample", "compute (s)", "steps", "sampling images/s", "Fréchet distance", "class accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        f = r["f"]
        stage = state["first_stages"].get(str(f), {})
        psnr, ceiling = stage.get("psnr"), stage.get("ceiling_accuracy")
        recon = "" if ceiling is None else f"{100 * ceiling:.0f} %, {stage['ceiling_fd']:.0f}"
        if f == 1:
            recon = "100 %, 0 (the renders)"
        images, rate = r.get("sample_images_per_s"), state["rates"][str(f)]
        lines.append(f"| {f} | {latent_shape(f)} | {'pixels' if psnr is None else f'{psnr:.1f} dB'} | "
                     f"{recon} | "
                     f"{rate['samples_per_s']:.1f} | {rate['gflop_per_sample']:.3f} | "
                     f"{r['compute_s']:g} | {r['steps']} | {'' if images is None else f'{images:.2f}'} | "
                     f"{r['fd']:.0f} | {100 * r['accuracy']:.0f} % |")
    reference = next((r["fd_reference"] for r in rows if r.get("fd_reference") is not None), None)
    floor = "" if reference is None else f" Real-vs-real Fréchet distance at this N: {reference:.0f}."
    return "\n".join(lines) + f"\n\n{state['setup']['n_eval']} held-out classes per evaluation.{floor}"


def plot(rows: list[dict[str, Any]], state: dict[str, Any], path: Path) -> None:
    """Fréchet distance and class accuracy against training compute, one line per factor (the paper's Fig. 6),
    and sampling throughput per factor (Fig. 7's other axis)."""
    from bench.plots import COLOURS, Panel, Series, _figure

    computes = sorted({r["compute_s"] for r in rows})
    factors = sorted({r["f"] for r in rows})
    by = {(r["f"], r["compute_s"]): r for r in rows}
    palette = [*COLOURS, (140, 86, 75)]
    lines_fd, lines_acc = [], []
    for i, f in enumerate(factors):
        done = [c for c in computes if (f, c) in by]
        if not done or done != computes[: len(done)]:
            continue  # a line runs from the first level on: a factor added later shows up to where it got
        lines_fd.append(Series(f"f={f}", [by[f, c]["fd"] for c in done], palette[i % len(palette)]))
        lines_acc.append(Series(f"f={f}", [100 * by[f, c]["accuracy"] for c in done], palette[i % len(palette)]))
    machine = state["setup"].get("device") or f"{state['setup']['threads']} CPU threads"
    image, origins = _figure(3, "Latent factor study: class-conditional shapes, equal training compute per factor "
                                f"({machine})")
    cats = [f"{c:g}" for c in computes]
    top = max((v for s in lines_fd for v in s.values), default=1.0)
    Panel(image, origins[0], "Frechet distance", "lower is better", cats, "training compute (s)", top).lines(lines_fd)
    Panel(image, origins[1], "class accuracy", "%", cats, "training compute (s)", 100.0).lines(lines_acc)
    rates = [next((r["sample_images_per_s"] or 0.0 for r in rows if r["f"] == f), 0.0) for f in factors]
    Panel(image, origins[2], "sampling", "images/s", [f"f={f}" for f in factors],
          f"{SAMPLER}, {state['setup']['sample_steps']} steps",
          max(rates) or 1.0).bars([Series("images/s", rates, COLOURS[0])])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
