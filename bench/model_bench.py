"""Model benchmark: our UNet step, VAE decode and a whole 20-step DPM-Solver++ 256x256 generation
against diffusers, at the real SD-1.5 size on the CPU in fp32, same weights and inputs.

Method (../shared/reference/cpu-baseline.md): one process, both implementations loaded, runs
interleaved (ours, diffusers, ours, ...) after a warm-up, medians and ratios. Each run records the CPU
time other processes used meanwhile (from /proc/stat); runs disturbed by more than 5 % of the machine
are dropped when enough clean ones remain. Peak memory is measured in fresh subprocesses, one per
implementation, each loading its model and running one whole generation (peak RSS). The UNet's FLOPs
are counted with the math attention backend (FlopCounterMode misses the fused CPU kernel) and set
against this machine's measured fp32 matmul peak: the faster of MKL (`torch.mm`) and oneDNN's matmul at
4096^2, measured before and after the runs (MKL is the slower one on AMD CPUs). The FLOPs are those of
direct convolutions; our Winograd ones (models/winograd.py) do 2.25x fewer multiplications, so the
"effective" rate measures time against the direct work and can pass the peak.

A table goes to stdout; the figures go to bench/results/model_bench.json. Not a test: nothing fails.
    python bench/model_bench.py [--runs 5] [--steps 20] [--size 256] [--quick] [--opt-ins [MODE ...]]

`--opt-ins` adds the UNet step in the CPU opt-in modes of bench/cpu_modes.py (bf16 on CPUs with AVX512-BF16 /
AMX, and compiled: torch.compile with freezing), the memory each mode's UNet holds and peaks at, and the
mean / max difference of its images from the fp32 path's, in /255 (on the parity model and on tiny-shapes).

`--loading` measures the way from files instead (bench/results/model_bench_loading.json): random SD-1.5-size
weights written once, by diffusers, as a diffusers folder and as one original-layout .safetensors file
(under --weights-dir, git-ignored; --reduced for a ~1.3 GB model and a quick run), then each case in a
fresh process: our `load_model` against diffusers' `from_pretrained` / `from_single_file` (load time and
the process's peak RSS), and a whole `ldm generate PROMPT --model FOLDER --steps 20 --sampler dpmpp_2m
--width 256 --height 256` process against the same generation in a diffusers StableDiffusionPipeline
process, peak RSS as the kernel accounts each finished child (wait4's ru_maxrss, what `/usr/bin/time -v`
shows as "Maximum resident set size").
    python bench/model_bench.py --loading [--reduced] [--weights-dir DIR]

`--family sdxl` measures the SDXL base UNet step instead (bench/sdxl_bench.py; half width unless --full).
    python bench/model_bench.py --family sdxl [--runs 5] [--full]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu_modes import MODES, Mode  # noqa: E402
from bench.results_io import publish  # noqa: E402
from models.config import ModelConfig, builtin_config  # noqa: E402
from models.cpu_inference import cpu_has_bf16, optimize_for_cpu_inference  # noqa: E402
from models.ldm import LatentDiffusion  # noqa: E402
from models.names import WINOGRAD_POLICIES, WinogradPolicy  # noqa: E402
from models.pipeline import Pipeline, RunSettings, SampleSpec  # noqa: E402
from models.text.clip import CLIPTextConditioner  # noqa: E402
from models.tokenizers import CLIPTokenizer  # noqa: E402
from tests.helpers import (  # noqa: E402
    diffusers_unet,
    diffusers_vae,
    hf_clip_text_model,
    save_diffusers_folder,
    write_clip_tokenizer,
)

PROMPT = "a photograph of an astronaut riding a horse on the moon"
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": False, "timestep_spacing": "leading", "prediction_type": "epsilon"}
HZ = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- building the twins


M = TypeVar("M", bound=torch.nn.Module)


def random_normal(module: M) -> M:
    """`module` (built on the meta device) materialised on the CPU with seeded normal weights, std 0.02: realistic
    magnitudes, much faster to draw than the layers' own initialisation."""
    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return module


def build_ours(tokenizer_dir: Path, config: ModelConfig | None = None) -> LatentDiffusion:
    """SD-1.5 shapes (or `config`'s) with random weights (normal, std 0.02: realistic magnitudes, fast to draw)."""
    with torch.device("meta"):
        model = random_normal(LatentDiffusion(config or builtin_config("sd-v1")))
    assert isinstance(model.conditioner, CLIPTextConditioner)
    model.conditioner.set_tokenizer(CLIPTokenizer.from_dir(tokenizer_dir))
    return model.eval().requires_grad_(False)


def build_diffusers(ours: LatentDiffusion, tokenizer_dir: Path) -> Any:
    """diffusers' StableDiffusionPipeline holding `ours`'s weights (shared storage), through diffusers' own
    single-file converters, with the DPM-Solver++ scheduler of SD_SCHEDULER."""
    import diffusers
    import transformers

    sd = ours.original_state_dict()  # shares storage with `ours`: no second copy of the weights
    unet = diffusers_unet({k: v for k, v in sd.items() if k.startswith("model.")}, ours.config.unet)
    vae = diffusers_vae({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, ours.config.autoencoder)
    assert ours.config.conditioner is not None
    clip_config = ours.config.conditioner.clip
    clip = hf_clip_text_model(sd, clip_config)
    tokenizer = transformers.CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                           model_max_length=clip_config.max_positions)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SD_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- measuring


def busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds so far (all cores)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / HZ


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], Any]) -> dict[str, float]:
    busy, own, start = busy_seconds(), own_cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    foreign = max(0.0, (busy_seconds() - busy) - (own_cpu_seconds() - own))
    return {"wall_s": wall, "foreign_cpu_s": foreign}


def interleaved(cases: dict[str, Callable[[], Any]], runs: int) -> dict[str, dict[str, Any]]:
    """A B A B ... after one warm-up each; medians over the clean runs."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    out = {}
    cores = os.cpu_count() or 1
    for name, runs_ in samples.items():
        clean = [r["wall_s"] for r in runs_ if r["foreign_cpu_s"] <= 0.05 * cores * r["wall_s"]]
        used = clean if len(clean) >= max(3, len(runs_) // 2) else [r["wall_s"] for r in runs_]
        out[name] = {"median_s": statistics.median(used), "runs_s": [round(r["wall_s"], 4) for r in runs_],
                     "clean_runs": len(clean), "used_runs": len(used)}
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() says only 'x86_64' on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peaks(n: int = 4096, runs: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of an n x n x n product through each GEMM library torch has here: MKL (`torch.mm`) and oneDNN
    (`mkldnn._linear_pointwise`, which our token linears use). On AMD CPUs MKL takes a slower code path (seen here:
    131-173 against oneDNN's 187-210 on a Zen 4), so `torch.mm` alone understates what the machine can do."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    products: dict[str, Callable[[], Any]] = {
        "torch_mm": lambda: torch.mm(a, b),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""),
    }
    rates = {}
    with torch.inference_mode():
        for name, product in products.items():
            product()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                product()
                times.append(time.perf_counter() - start)
            rates[name] = round(2 * n**3 / statistics.median(times) / 1e9, 1)
    return rates


def matmul_peak_gflops(*measured: dict[str, float]) -> float:
    """The machine's fp32 matmul peak: the best rate any library reached in any of the `measured` sets (a peak
    is a maximum: a disturbed measurement can only lower it); one fresh measurement when none is given."""
    return max(rate for rates in (measured or (matmul_peaks(),)) for rate in rates.values())


def count_gflop(fn: Callable[[], Any]) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def onednn_linear(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:  # models/layers.py's product
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * x_shape[-1] * w_shape[0]

    mapping = {torch.ops.mkldnn._linear_pointwise: onednn_linear}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def peak_rss_subprocess(which: str, steps: int, size: int, winograd: WinogradPolicy = "balanced") -> float:
    """Peak RSS (GiB) of a fresh process that builds one implementation and runs one generation."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", which, "--steps", str(steps),
                          "--size", str(size), "--winograd", winograd], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_probe(which: str, steps: int, size: int, winograd: WinogradPolicy) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(Path(tmp) / "tokenizer")
        ours = build_ours(tok)
        with torch.inference_mode():
            if which == "ours":
                Pipeline(ours, winograd=winograd).txt2img([SampleSpec(PROMPT, seed=0)],
                                                          RunSettings("dpmpp_2m", steps, size, size))
            else:
                pipe = build_diffusers(ours, tok)
                del ours
                pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(0))
    print(peak_rss_gib())


# ----------------------------------------------------------------------------- loading from files


def write_weights(folder: Path, reduced: bool) -> Path:
    """Random SD-1.5-size weights (or a reduced model) as `model.safetensors` + `diffusers/` + `tokenizer/`,
    once: a folder with a `done` marker is reused."""
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = write_clip_tokenizer(folder / "tokenizer")
    config = builtin_config("sd-v1")
    if reduced:
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, model_channels=160),
                                     autoencoder=dataclasses.replace(config.autoencoder, ch=64))
    with torch.device("meta"):
        model = LatentDiffusion(config)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    sd = model.original_state_dict()  # shares the model's storage: no second copy
    sd["betas"] = model.schedule.betas.float()
    save_file(sd, str(folder / "model.safetensors"))
    save_diffusers_folder(sd, config, tok, folder / "diffusers")
    (folder / "done").write_text("")
    return folder


def load_probe(impl: str, layout: str, weights: Path) -> None:
    """In a fresh process: load one way, print load seconds and this process's peak RSS."""
    start = time.perf_counter()
    if impl == "ours":
        from models.checkpoints import load_model

        source = weights / "diffusers" if layout == "folder" else weights / "model.safetensors"
        load_model(source, tokenizer_dir=weights / "tokenizer")
    else:
        import diffusers

        cls = diffusers.StableDiffusionPipeline
        if layout == "folder":
            cls.from_pretrained(str(weights / "diffusers"), safety_checker=None, requires_safety_checker=False)
        else:
            cls.from_single_file(str(weights / "model.safetensors"), config=str(weights / "diffusers"),
                                 local_files_only=True, safety_checker=None, requires_safety_checker=False)
    print(json.dumps({"load_s": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}))


DIFFUSERS_GENERATE = """
import sys, diffusers, torch
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None,
                                                         requires_safety_checker=False)
pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe(sys.argv[2], height=256, width=256, num_inference_steps=int(sys.argv[3]), guidance_scale=7.5,
     generator=torch.Generator().manual_seed(0)).images[0].save(sys.argv[4])
"""


def child_peak(cmd: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS (GiB) of a child process, as the kernel accounted it when it ended (and its
    stdout). Linux starts a child's ru_maxrss at its parent's peak (fork + exec), so this process must stay
    small: the weights are written by a child of their own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "stdout": stdout}  # ru_maxrss is in KiB


def loading(weights: Path, steps: int) -> dict[str, Any]:
    """Each case once in a fresh process, ours and diffusers alternating (file pages warm after a first read)."""
    results: dict[str, Any] = {}
    for layout in ("folder", "single"):
        for impl in ("ours", "diffusers"):
            out = child_peak([sys.executable, __file__, "--load-probe", impl, layout, "--weights-dir", str(weights)])
            probe = json.loads(out.pop("stdout").strip().splitlines()[-1])
            results.setdefault(f"load_{layout}", {})[impl] = {**out, **probe}  # the probe's own VmHWM and time
    with tempfile.TemporaryDirectory() as tmp:
        results["generate"] = {  # peak RSS here: wait4's ru_maxrss of the whole process
            "ours": child_peak([sys.executable, "-m", "service.cli", "generate", PROMPT, "--model",
                                str(weights / "diffusers"), "--steps", str(steps), "--sampler", "dpmpp_2m",
                                "--width", "256", "--height", "256", "--out", str(Path(tmp) / "ours.png")]),
            "diffusers": child_peak([sys.executable, "-c", DIFFUSERS_GENERATE, str(weights / "diffusers"), PROMPT,
                                     str(steps), str(Path(tmp) / "diffusers.png")]),
        }
    for r in results["generate"].values():
        r.pop("stdout")
    return results


def loading_report(data: dict[str, Any]) -> str:
    lines = ["| what (fresh process each) | ours (s) | diffusers (s) | ours peak RSS (GiB) "
             "| diffusers peak RSS (GiB) |",
             "|---|---|---|---|---|"]
    names = {"load_folder": "load a diffusers folder (`from_pretrained`)",
             "load_single": "load one .safetensors file (`from_single_file`)",
             "generate": f"whole `ldm generate` process, {data['setup']['steps']} steps 256x256 (wall, load included)"}
    for key, r in data["results"].items():
        time_key = "wall_s" if key == "generate" else "load_s"
        ours, theirs = r["ours"], r["diffusers"]
        lines.append(f"| {names[key]} | {ours.get(time_key, ours['wall_s']):.1f} | "
                     f"{theirs.get(time_key, theirs['wall_s']):.1f} | {ours['peak_rss_gib']:.2f} | "
                     f"{theirs['peak_rss_gib']:.2f} |")
    lines.append(f"\n{data['setup']['weights']}, {data['setup']['weights_gib']:.2f} GiB of fp32 tensors.")
    return "\n".join(lines)


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    through fork + exec, so a child of a big process would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


# ----------------------------------------------------------------------------- the benchmark


def opt_in_unets(eager: LatentDiffusion, x: Any, t: Any, ctx: Any, modes: tuple[Mode, ...]
                 ) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """UNet-step cases of the opt-in `modes` (bench/cpu_modes.py) and each mode's memory cost (its UNet copy,
    prepared and run once: compilation included), beside the default fp32 path's for comparison."""
    from bench.cpu_modes import memory_cost, prepared_unet

    cases: dict[str, Callable[[], Any]] = {}
    memory: dict[str, Any] = {}
    for mode in (None, *modes):
        if mode == "bf16" and not cpu_has_bf16():
            memory["bf16"] = "not offered: this CPU reports neither avx512_bf16 nor amx_bf16"
            continue
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        xm, ctxm = x.to(dtype), ctx.to(dtype)

        def prepare(mode: Any = mode, xm: Any = xm, ctxm: Any = ctxm) -> Any:
            unet = prepared_unet(eager.unet, mode)
            start = time.perf_counter()
            unet(xm, t, ctxm)
            return unet, time.perf_counter() - start

        (unet, first_s), cost = memory_cost(prepare)
        memory[mode or "fp32"] = {**cost, "first_call_s": round(first_s, 1)}
        if mode is None:
            del unet
            continue
        cases[f"ours_{mode}"] = lambda unet=unet, xm=xm, ctxm=ctxm: unet(xm, t, ctxm)
    return cases, memory


def run(runs: int, steps: int, size: int, quick: bool, opt_ins: tuple[Mode, ...] = (),
        winograd: WinogradPolicy = "balanced") -> dict[str, Any]:
    tmp = tempfile.TemporaryDirectory()
    tok = write_clip_tokenizer(Path(tmp.name) / "tokenizer")
    eager = build_ours(tok)
    pipe = build_diffusers(eager, tok)
    fast = optimize_for_cpu_inference(copy.deepcopy(eager), winograd)
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    z = torch.randn(1, 4, latent, latent, generator=g)
    results: dict[str, Any] = {}
    peaks_before = matmul_peaks()
    with torch.inference_mode():
        unet_gflop = count_gflop(lambda: eager.unet(x, t, ctx))
        vae_gflop = count_gflop(lambda: eager.autoencoder.decode(z))
        modes, mode_memory = opt_in_unets(eager, x, t, ctx, opt_ins) if opt_ins else ({}, {})
        results["unet_step"] = interleaved({
            "ours": lambda: fast.unet(x, t, ctx),
            "ours_eager": lambda: eager.unet(x, t, ctx),
            "diffusers": lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample,
            **modes,
        }, runs)
        del modes
        results["vae_decode"] = interleaved({
            "ours": lambda: fast.autoencoder.decode(z),
            "diffusers": lambda: pipe.vae.decode(z).sample,
        }, runs)
        if not quick:
            settings = RunSettings("dpmpp_2m", steps, size, size)
            results["txt2img"] = interleaved({
                "ours": lambda: Pipeline(fast).txt2img([SampleSpec(PROMPT, seed=0)], settings),
                "diffusers": lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                                          guidance_scale=7.5, generator=torch.Generator().manual_seed(0)),
            }, runs)
    peaks = [peaks_before, matmul_peaks()]
    peak = matmul_peak_gflops(*peaks)
    memory = {} if quick else {"ours": peak_rss_subprocess("ours", steps, size, winograd),
                               "diffusers": peak_rss_subprocess("diffusers", steps, size)}
    extra: dict[str, Any] = {}
    if opt_ins:
        from bench.cpu_modes import quality_models

        extra = {"opt_in_memory_gib": mode_memory, "opt_in_quality": quality_models(modes=opt_ins)}
    return {
        **extra,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "bf16_hardware": bool(cpu_has_bf16()),
                    "load_average_at_end": os.getloadavg(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "diffusers": __import__("diffusers").__version__, "matmul_peak_gflops": round(peak, 1),
                    "matmul_gflops_measured": peaks},
        "setup": {"size_px": size, "latent": latent, "steps": steps, "runs": runs, "guidance": 7.5,
                  "winograd": winograd, "unet_batch": 2, "dtype": "fp32", "weights": "random, SD-1.5 shapes"},
        "flops": {"unet_step_gflop": round(unet_gflop, 1), "vae_decode_gflop": round(vae_gflop, 1)},
        "results": results,
        "peak_rss_gib": {k: round(v, 2) for k, v in memory.items()},
    }


def peak_note(machine: dict[str, Any]) -> str:
    """How the peak was measured: older result files hold `torch.mm` alone."""
    measured = machine.get("matmul_gflops_measured")
    if not measured:
        return "torch.mm 4096^2"
    best = {name: max(rates[name] for rates in measured) for name in measured[0]}
    return "the faster of torch.mm and oneDNN's matmul, 4096^2, before and after the runs: " + ", ".join(
        f"{name.replace('_', '.')} {rate:.0f}" for name, rate in best.items())


def report(data: dict[str, Any]) -> str:
    res, flops, peak = data["results"], data["flops"], data["machine"]["matmul_peak_gflops"]
    size = data["setup"]["size_px"]
    lines = ["| what | ours (s) | diffusers (s) | ours / diffusers | ours effective GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|"]
    names = {"unet_step": f"UNet step, {size // 8}x{size // 8} latent, batch 2 (CFG)",
             "vae_decode": f"VAE decode to {size} px",
             "txt2img": f"txt2img {size}x{size}, DPM-Solver++ {data['setup']['steps']} steps, CFG 7.5"}
    policy = data["setup"].get("winograd", "balanced")
    if policy != "balanced":
        names["unet_step"] += f" (Winograd policy: {policy})"
    gflop = {"unet_step": flops["unet_step_gflop"], "vae_decode": flops["vae_decode_gflop"]}
    for key, r in res.items():
        ours, theirs = r["ours"]["median_s"], r["diffusers"]["median_s"]
        rate = f"{gflop[key] / ours:.0f}" if key in gflop else ""
        share = f"{100 * gflop[key] / ours / peak:.0f} %" if key in gflop else ""
        lines.append(f"| {names[key]} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | {rate} | {share} |")
    if "ours_eager" in res.get("unet_step", {}):
        eager = res["unet_step"]["ours_eager"]["median_s"]
        lines.append(f"| UNet step, ours without CPU optimisations | {eager:.3f} | | "
                     f"{eager / res['unet_step']['diffusers']['median_s']:.2f} | {gflop['unet_step'] / eager:.0f} | |")
    unet_res = res.get("unet_step", {})
    for mode in ("bf16", "compiled"):
        if f"ours_{mode}" not in unet_res:
            continue
        t_mode = unet_res[f"ours_{mode}"]["median_s"]
        mem = data.get("opt_in_memory_gib", {}).get(mode, {})
        quality = data.get("opt_in_quality", {})
        diffs = "; ".join(f"{name.replace('_', ' ')}: mean {q['modes'][mode]['mean_abs_255']}, max "
                          f"{q['modes'][mode]['max_abs_255']} /255" for name, q in quality.items()
                          if isinstance(q, dict) and mode in q.get("modes", {}))
        lines.append(f"| UNet step, opt-in {mode} (vs fp32 images: {diffs or 'not measured'}; UNet memory held "
                     f"{mem.get('held_gib', '?')} GiB, peak +{mem.get('peak_extra_gib', '?')} GiB, first call "
                     f"{mem.get('first_call_s', '?')} s) | {t_mode:.3f} | | "
                     f"{t_mode / unet_res['diffusers']['median_s']:.2f} | {gflop['unet_step'] / t_mode:.0f} | "
                     f"{100 * gflop['unet_step'] / t_mode / peak:.0f} % |")
    if "fp32" in data.get("opt_in_memory_gib", {}):
        m = data["opt_in_memory_gib"]["fp32"]
        lines.append(f"| (default fp32 UNet, for comparison: memory held {m['held_gib']} GiB, peak "
                     f"+{m['peak_extra_gib']} GiB, first call {m['first_call_s']} s) | | | | | |")
    if data["peak_rss_gib"]:
        m = data["peak_rss_gib"]
        lines.append(f"| peak RSS, one whole generation (GiB) | {m['ours']:.2f} | {m['diffusers']:.2f} | "
                     f"{m['ours'] / m['diffusers']:.2f} | | |")
    lines.append(f"\nfp32 matmul peak measured here: {peak:.0f} GFLOP/s ({peak_note(data['machine'])}); "
                 f"UNet step {flops['unet_step_gflop']} GFLOP, VAE decode {flops['vae_decode_gflop']} GFLOP, counted "
                 "for direct convolutions: our Winograd convolutions do fewer multiplications, so the effective rate "
                 "can pass the peak.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case after the warm-up (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the whole generation (default 20)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--quick", action="store_true", help="UNet and VAE only, no whole generation or memory")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_bench.json")
    parser.add_argument("--opt-ins", nargs="*", choices=("bf16", "compiled"), default=None, metavar="MODE",
                        help="also the UNet step in the CPU opt-in modes (bf16 where the CPU has it, compiled; all "
                        "when none is named), their memory cost and their images' difference from fp32 "
                        "(bench/cpu_modes.py)")
    parser.add_argument("--memory-only", action="store_true",
                        help="re-measure only the peak memory rows of an existing --out file")
    parser.add_argument("--memory-probe", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--winograd", choices=WINOGRAD_POLICIES, default="balanced",
                        help="which of our UNet convolutions go by Winograd (models/cpu_inference.py; default "
                        "balanced, as a worker's)")
    parser.add_argument("--loading", action="store_true", help="loading from files and whole processes (see above)")
    parser.add_argument("--reduced", action="store_true", help="with --loading: a ~1.3 GB model, not SD-1.5's 4.3 GB")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="with --loading: where the random weights are written once (default scratch/, ignored)")
    parser.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-probe", nargs=2, metavar=("IMPL", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=("sd", "sdxl"), default="sd",
                        help="sdxl: the SDXL base UNet step at latent 64x64, batch 2 (bench/sdxl_bench.py; figures in "
                        "bench/results/model_bench_sdxl.json)")
    parser.add_argument("--full", action="store_true", help="with --family sdxl: the real width (10 GB per copy), "
                        "not half width")
    args = parser.parse_args()
    if args.family == "sdxl":
        from bench.sdxl_bench import report_sdxl, run_sdxl

        data = run_sdxl(args.runs, args.full)
        default_out = ROOT / "bench" / "results" / "model_bench.json"
        publish(data, report_sdxl(data), args.out if args.out != default_out else
                default_out.with_name("model_bench_sdxl.json"))
        return
    weights = args.weights_dir or ROOT / "scratch" / ("sd15-random-reduced" if args.reduced else "sd15-random")
    if args.memory_probe:
        memory_probe(args.memory_probe, args.steps, args.size, args.winograd)
        return
    if args.load_probe:
        load_probe(args.load_probe[0], args.load_probe[1], weights)
        return
    if args.write_weights:
        write_weights(weights, args.reduced)
        return
    if args.loading:
        subprocess.run([sys.executable, __file__, "--write-weights", "--weights-dir", str(weights),
                        *(["--reduced"] if args.reduced else [])], check=True)
        nbytes = (weights / "model.safetensors").stat().st_size
        data = {"setup": {"steps": args.steps, "size_px": 256, "dtype": "fp32", "threads": torch.get_num_threads(),
                          "weights": "random, " + ("reduced SD-1.5 shapes" if args.reduced else "SD-1.5 shapes"),
                          "weights_gib": nbytes / 2**30},
                "results": loading(weights, args.steps)}
        default_out = ROOT / "bench" / "results" / "model_bench.json"
        out = args.out if args.out != default_out else default_out.with_name("model_bench_loading.json")
        publish(data, loading_report(data), out)
        return
    if args.memory_only:
        data = json.loads(args.out.read_text())
        steps, size = data["setup"]["steps"], data["setup"]["size_px"]
        data["peak_rss_gib"] = {k: round(peak_rss_subprocess(k, steps, size, args.winograd), 2)
                                for k in ("ours", "diffusers")}
    else:
        opt_ins: tuple[Mode, ...] = () if args.opt_ins is None else tuple(args.opt_ins) or MODES
        data = run(args.runs, args.steps, args.size, args.quick, opt_ins, args.winograd)
    publish(data, report(data), args.out)


if __name__ == "__main__":
    main()
