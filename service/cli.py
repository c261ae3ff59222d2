"""The `ldm` command. Each subcommand builds its parser here and runs in its own function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models.eval.cli import add_eval_parser
from models.names import DTYPES, GPU_MODES, SAMPLERS, TASKS, WINOGRAD_POLICIES, ConditionTask, Task
from models.train.cli import add_train_parser
from service.zoo_commands import add_zoo_parsers


def _generate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "generate",
        help="text-to-image (or class, layout, semantic map, unconditional) offline, no server",
        description="Generate images from prompts with a shipped model, a checkpoint file or a diffusers "
        "folder, offline. Progress goes to stderr; PNG text chunks carry the parameters. With --task, a "
        "class-conditional (--class), layout-to-image (--layout boxes.json), semantic-synthesis (--map labels.png) "
        "or unconditional model generates instead; `python -m models.eval.conditions --out DIR` writes example "
        "label maps and layouts.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (or use --from-file)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="what to condition on (default: txt2img, or what --class/--map/--layout imply); img2img "
                   "and inpaint take --image (inpaint also --mask) and an optional prompt, upscale takes --image "
                   "(and a prompt with the SD x4 upscaler)")
    p.add_argument("--image", type=Path, help="--task img2img/inpaint/upscale: the input image")
    p.add_argument("--mask", type=Path, help="--task inpaint: the mask, white = repaint")
    p.add_argument("--strength", type=float, default=0.75, help="--task img2img: how much to change, 0..1 "
                   "(default: %(default)s)")
    p.add_argument("--noise-level", type=int, default=None, help="--task upscale with the SD x4 upscaler: the noise "
                   "added to the low-resolution input, 0..the model's max (350); more invents more detail and keeps "
                   "less of the input (default: the model's, 20)")
    p.add_argument("--class", dest="class_label", metavar="CLASS",
                   help="--task class: the class, a name such as 'red circle' or an id")
    p.add_argument("--map", type=Path, help="--task semantic: a label map PNG (mode L or P, pixel value = label, "
                   "0 = background); its size is the image size")
    p.add_argument("--layout", type=Path, help='--task layout: a JSON list of {"label": "red circle", "box": '
                   "[x0, y0, x1, y1]} with coordinates in [0, 1]")
    p.add_argument("--from-file", type=Path, help="one prompt a line; OUT is then a folder of NNN.png, "
                   "line i generated with seed SEED + i (with --n N: NNN-k.png, seed SEED + i*N + k)")
    p.add_argument("--model", default="tiny-shapes",
                   help="a shipped model name, a .safetensors/.ckpt file, a diffusers folder, or "
                   "random:<config> for untrained random weights from models/configs/ (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps, 1..1000 (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="(default: the model's own, its config's default_sampler: euler_a for the shapes-class, "
                   "-layout, -semantic and -uncond models; else dpmpp_2m, as with --karras)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; 1 = off "
                   "(default: the model's own where its config sets one, for the sampler (sampler_guidance: PLMS 2 "
                   "on shapes-class and -layout) or for all (default_guidance: tiny-shapes 2.5); else 7.5 for "
                   "txt2img, 5 for class, 3 for layout, 2 for semantic; 1 for the CompVis zoo models without an "
                   "unconditional input: cin256, layout2img-openimages256, the semantic-map models)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("--width", type=int, help="pixels, a multiple of the model's factor (default: the model's)")
    p.add_argument("--height", type=int, help="pixels (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per prompt, seeds SEED..SEED+n-1 (default: 1)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for a single checkpoint file, which carries "
                   "none: vocab.json + merges.txt (SD v1's CLIP) or vocab.txt (the CompVis text2img model's BERT)")
    p.add_argument("--tokenizer-2", type=Path, help="SDXL's second tokenizer folder (OpenCLIP bigG's: the "
                   "`tokenizer_2/` folder of a diffusers SDXL repository) for a single SDXL file; the refiner's "
                   "one encoder takes this one")
    p.add_argument("--config", type=Path, help="a CompVis zoo config.yaml for --model (default: the config.yaml "
                   "beside a .ckpt, when there is one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--winograd", choices=WINOGRAD_POLICIES, default="balanced",
                   help="which 3x3 convolutions the CPU path computes by Winograd's F(2x2, 3x3), the same images to "
                   "float rounding: balanced (default) the UNet's of 256-640 channels and the VAE's of at least 256; "
                   "all the UNet's 1280-channel ones too "
                   "(SD-1.5's step 7 %% faster at 256 px, +1.5 GB of peak memory); off none (docs/benchmarks.md)")
    p.add_argument("--gpu-mode", choices=GPU_MODES, default="graphs",
                   help="how a model on a GPU runs its UNet: graphs (default) replays a CUDA graph per batch and "
                   "size, eager runs the modules, compile goes through torch.compile (docs/benchmarks.md)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts, for files that do not say (SD 2: 512-base epsilon, 768-v "
                   "v_prediction)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA file (kohya/A1111 or diffusers) and its weight (default 1); repeatable")
    p.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111",
                   help="a1111: AUTOMATIC1111's (word:1.3), [word], BREAK and prompts past 75 tokens (default); "
                   "plain: the text as is, as diffusers (docs/lora-and-prompts.md)")
    p.add_argument("--embeddings", type=Path, default=None, metavar="DIR",
                   help="textual-inversion embeddings (A1111 .pt/.safetensors, diffusers learned_embeds) a prompt "
                   "names by file stem")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="txt2img with an SDXL base: the refiner (a diffusers folder, a single file, a shipped name) "
                   "that finishes each image, as diffusers' denoising_end / denoising_start (docs/generate.md)")
    p.add_argument("--refiner-switch", type=float, default=None, metavar="F",
                   help="with --refiner: the fraction of the steps' noise range the base denoises before the "
                   "refiner takes over, in (0, 1) (default: 0.8)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="output PNG (default out.png), or folder with --from-file (default: out/)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from service.generate import GenerateOptions, TaskInputs, generate, generate_task

    given: tuple[tuple[ConditionTask, object], ...] = (("class", args.class_label), ("semantic", args.map),
                                                       ("layout", args.layout))
    implied = [t for t, value in given if value is not None]
    task: Task = args.task or (implied[0] if len(implied) == 1 else "txt2img")
    if task not in ("img2img", "inpaint", "upscale") and (args.image is not None or args.mask is not None):
        raise SystemExit("ldm generate: --image and --mask are for --task img2img, inpaint or upscale")
    if task == "txt2img" and implied:
        raise SystemExit(f"ldm generate: --class, --map and --layout are for --task {'/'.join(implied)}, not txt2img")
    if task == "txt2img" and (args.prompt is None) == (args.from_file is None):
        raise SystemExit("ldm generate: give either a PROMPT or --from-file FILE")
    if args.noise_level is not None and task != "upscale":
        raise SystemExit("ldm generate: --noise-level is for --task upscale")
    if args.refiner is not None and task != "txt2img":
        raise SystemExit(f"ldm generate: --refiner finishes txt2img images, not --task {task}")
    if args.refiner_switch is not None and args.refiner is None:
        raise SystemExit("ldm generate: --refiner-switch needs --refiner PATH")
    # a text model needs one; the zoo's inpainting and super-resolution models take none
    prompted = task in ("img2img", "inpaint", "upscale")
    if task != "txt2img" and (args.from_file is not None or (args.prompt is not None and not prompted)):
        takes = "--from-file" if prompted else "prompt or --from-file"
        raise SystemExit(f"ldm generate: --task {task} takes no {takes}")
    options = GenerateOptions(
        model=args.model, seed=args.seed, steps=args.steps, sampler=args.sampler, karras=args.karras,
        eta=args.eta, guidance=args.guidance,
        negative_prompt=args.negative_prompt, width=args.width,
        height=args.height, n=args.n, tokenizer=args.tokenizer, tokenizer_2=args.tokenizer_2, device=args.device,
        dtype=args.dtype, winograd=args.winograd, gpu_mode=args.gpu_mode, use_ema=args.ema, config=args.config,
        strength=args.strength,
        prediction_type=args.prediction_type, loras=tuple(args.lora), prompt_syntax=args.prompt_syntax,
        embeddings=args.embeddings, noise_level=args.noise_level, refiner=args.refiner,
        refiner_switch=0.8 if args.refiner_switch is None else args.refiner_switch,
    )
    if task != "txt2img":
        inputs = TaskInputs(class_label=args.class_label, map_path=args.map, layout_path=args.layout,
                            image_path=args.image, mask_path=args.mask, prompt=args.prompt or "")
        written = generate_task(task, inputs, options, out_file=args.out or Path("out.png"))
    elif args.from_file is not None:
        prompts = [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.from_file} holds no prompts (one a line)")
        written = generate(prompts, options, out_dir=args.out or Path("out"))
    else:
        written = generate([args.prompt], options, out_file=args.out or Path("out.png"))
    for path in written:
        print(path)
    return 0


def _service_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve", help="one box: embedded Redis, REST + gRPC, one supervised worker",
        description="Start everything on this machine: an embedded Redis (unless LDM_REDIS_URL is set; data under "
        "LDM_DATA_DIR), the REST API (LDM_REST_HOST:LDM_REST_PORT, default 127.0.0.1:8000), the gRPC server "
        "(default 127.0.0.1:50051) and worker processes, restarted if they die. Settings: LDM_* variables or a "
        "YAML file named by LDM_CONFIG_FILE (docs/settings.md).")
    serve.add_argument("--model", default=None, help="model spec the workers load: a shipped name, a checkpoint "
                       "file, a diffusers folder or random:<config> (default: LDM_DEFAULT_MODEL if it is shipped, "
                       "else random:tiny-sd)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1; one per GPU)")
    serve.set_defaults(func=run_serve)
    api = sub.add_parser("api", help="REST + gRPC front ends only (needs LDM_REDIS_URL)",
                         description="Run the REST API and the gRPC server against the Redis at LDM_REDIS_URL. "
                         "Stateless: run as many replicas as you like.")
    api.set_defaults(func=run_api)
    worker = sub.add_parser("worker", help="one worker process for one model (needs LDM_REDIS_URL)",
                            description="Load one model and serve its queue: claim, batch, generate, store PNGs. "
                            "One per GPU. SIGTERM finishes the batch in hand, then exits.")
    worker.add_argument("--model", required=True, help="model spec: a shipped name, a checkpoint file, a "
                        "diffusers folder, or random:<config>")
    worker.add_argument("--model-name", default=None, help="the name clients use (default: derived from --model)")
    worker.add_argument("--worker-id", default=None, help="unique id (default: host-pid)")
    worker.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: LDM_WORKER_DEVICE or auto)")
    worker.set_defaults(func=run_worker)


def _keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser(
        "keys", help="make API keys and their digests",
        description="The service is configured with SHA-256 digests of API keys, never with the keys: give the key "
        "to the client, put the digest in LDM_API_KEY_HASHES (comma-separated) or a line of LDM_API_KEY_FILE. "
        "Clients send 'Authorization: Bearer <key>' (gRPC: metadata 'authorization').")
    verbs = keys.add_subparsers(dest="verb", required=True)
    new = verbs.add_parser("new", help="print a fresh random key and its digest",
                           description="Print a fresh key (256 random bits) on the first line and its SHA-256 "
                           "digest on the second. The key is stored nowhere: hand it to the client now.")
    new.add_argument("--label", default=None, help="a name for the key file line printed with the digest")
    new.set_defaults(func=run_keys_new)
    digest = verbs.add_parser("hash", help="print the digest of a key read from stdin",
                              description="Read a key from stdin (not from the command line, which ps and shell "
                              "history show) and print its SHA-256 digest. In a terminal it asks without echo.")
    digest.set_defaults(func=run_keys_hash)


def _grid_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "grid", help="a small PNG grid of what a model makes (fixed conditions x fixed seeds)",
        description="Draw a model's images for a fixed set of conditions (prompts for text models, classes, the "
        "held-out layouts or label maps, seeds for unconditional models; one column each, captioned) and fixed "
        "seeds (one row each) into one PNG. The same command makes the same file. `--all DIR` writes "
        "DIR/grid-<name>.png for every shipped model (the README's and the model cards' pictures: "
        "`ldm grid --all docs`).")
    p.add_argument("--model", default="tiny-shapes", help="shipped name, checkpoint file or diffusers folder "
                   "(default: %(default)s)")
    p.add_argument("-o", "--out", type=Path, default=None, help="output PNG (default: grid-<model>.png)")
    p.add_argument("--all", type=Path, default=None, metavar="DIR",
                   help="write DIR/grid-<name>.png for every shipped model instead")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one row each (default: 0 1)")
    p.add_argument("--steps", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="(default: the model's own, its config's default_sampler; else dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's default for its task and sampler)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt for a text model's column (repeat; default: six shapes-grammar prompts)")
    p.add_argument("--scale", type=int, default=2, help="enlarge each image this many times (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    p.set_defaults(func=run_grid)


def run_grid(args: argparse.Namespace) -> int:
    from service.grid import run_grid as grid

    return grid(args)


def run_keys_new(args: argparse.Namespace) -> int:
    from service.auth import hash_key, new_key

    key = new_key()
    label = f" {args.label}" if args.label else ""
    print(f"key:    {key}")
    print(f"sha256: {hash_key(key)}{label}")
    print("Give the key to the client (it is shown once); configure the sha256 line: LDM_API_KEY_HASHES or a "
          "line of LDM_API_KEY_FILE.", file=sys.stderr)
    return 0


def run_keys_hash(args: argparse.Namespace) -> int:
    import getpass

    from service.auth import hash_key

    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key.strip()
    if not key:
        raise ValueError("no key on stdin (e.g. `printf %s \"$KEY\" | ldm keys hash`)")
    print(hash_key(key))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.serve import run_serve as serve

    settings = load_settings()
    return serve(settings, args.model or settings.default_model, workers=args.workers)


def run_api(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.serve import run_api as api

    return api(load_settings())


def run_worker(args: argparse.Namespace) -> int:
    from service.config import load_settings
    from service.placeholders import refuse_placeholder_secrets
    from service.worker.process import run_worker as worker

    settings = load_settings()
    if settings.redis_url is None:
        raise ValueError("ldm worker needs a Redis: set LDM_REDIS_URL (or run `ldm serve`, which starts one)")
    refuse_placeholder_secrets(settings)
    return worker(settings, args.model, worker_id=args.worker_id, device=args.device, model_name=args.model_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent Diffusion Models: library, service and tools.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    add_zoo_parsers(sub)
    _grid_parser(sub)
    _service_parsers(sub)
    _keys_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, OSError) as err:  # usage and file errors (a missing file, an -o that is a folder)
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
