"""`ldm generate` on the CompVis zoo beyond the contract's seven cases (cin256 and layout2img-openimages256,
unguided; img2img with a prompt), `ldm reconstruct`, `ldm convert` and `ldm eval --images`. The seven contract
cases (compvis-zoo-contract.md, "Cases") run `ldm generate` with exactly the contract's flags in
tests/unit/test_compvis_zoo.py, where each command's PNG is compared with the independent implementation. The
checkpoints are the reduced random-weight ones of tests/compvis_zoo.py; here each command line must give the
image the library gives for what its flags mean. In process (`main`), one thread: model loads in subprocesses
would cost a minute of imports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.checkpoints import load_model
from models.conditioning import Box
from models.pipeline import Pipeline, RunSettings, SampleSpec
from service.cli import main
from tests.compvis_zoo import FIRST_STAGE_KL_F8, ZooFiles, assert_close_images

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 3
COMMON = ["--sampler", "ddim", "--eta", "0", "--steps", "10", "--seed", str(SEED)]
DDIM = RunSettings(sampler="ddim", steps=10, eta=0.0)
FEW = RunSettings(sampler="ddim", steps=3, eta=0.0)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "painting", "of", "fox"]


def _run(tmp_path: Path, *args: str | Path, steps: int = 10) -> np.ndarray:
    """The command with the contract's common flags (`steps` other than 10 only for the cases beyond its seven)."""
    out = tmp_path / "out.png"
    common = [*COMMON[:4], "--steps", str(steps), *COMMON[6:]]
    assert main(["generate", *map(str, args), *common, "-o", str(out)]) == 0
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> ZooFiles:
    """The module's checkpoints, each written once."""
    return ZooFiles(tmp_path_factory.mktemp("zoo"))


def _rng_image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    return Image.fromarray(blocks.astype(np.uint8))


def test_cin256_unguided_by_default(tmp_path: Path, zoo: ZooFiles, capsys: pytest.CaptureFixture[str]) -> None:
    """cin256 has no null class: without --guidance it samples unguided (scale 1), and --guidance 3 is refused
    with a message naming the missing null class."""
    ckpt = zoo.ckpt("cin256")
    got = _run(tmp_path, "--model", ckpt, "--class", "207", steps=3)
    model = load_model(ckpt)
    want = Pipeline(model).class2img([SampleSpec(seed=SEED, guidance_scale=1.0)], FEW, [207]).images[0]
    assert_close_images(got, np.asarray(want))
    assert main(["generate", "--model", str(ckpt), "--class", "207", "--guidance", "3",
                 *COMMON, "-o", str(tmp_path / "x.png")]) == 2
    assert "no null class" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_layout2img_openimages256(tmp_path: Path, zoo: ZooFiles, capsys: pytest.CaptureFixture[str]) -> None:
    """`--layout boxes.json` with OpenImages category numbers: taming's box tokens, unguided."""
    ckpt = zoo.ckpt("layout2img-openimages256")
    layout = [{"label": 5, "box": [0.25, 0.5, 0.75, 1.0]}, {"label": 339, "box": [0.1, 0.2, 0.7, 0.9]}]
    (tmp_path / "boxes.json").write_text(json.dumps(layout), encoding="utf-8")
    got = _run(tmp_path, "--model", ckpt, "--layout", tmp_path / "boxes.json", steps=3)
    model = load_model(ckpt)
    boxes = [Box(5, 0.25, 0.5, 0.75, 1.0), Box(339, 0.1, 0.2, 0.7, 0.9)]
    want = Pipeline(model).layout2img([SampleSpec(seed=SEED, guidance_scale=1.0)], FEW, [boxes]).images[0]
    assert_close_images(got, np.asarray(want))
    (tmp_path / "bad.json").write_text(json.dumps([{"label": 340, "box": [0, 0, 1, 1]}]), encoding="utf-8")
    assert main(["generate", "--model", str(ckpt), "--layout", str(tmp_path / "bad.json"),
                 *COMMON, "-o", str(tmp_path / "x.png")]) == 2
    assert "340" in capsys.readouterr().err


def test_reconstruct_prints_psnr_and_convert_round_trips(tmp_path: Path, zoo: ZooFiles,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from models.autoencoder import Autoencoder
    from models.compvis.first_stage import first_stage_from_yaml
    from tests.helpers import randomize

    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.yaml").write_text(FIRST_STAGE_KL_F8, encoding="utf-8")
    sd = randomize(Autoencoder(first_stage_from_yaml(tmp_path / "kl" / "config.yaml")), 1).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "kl" / "model.ckpt")
    _rng_image(32, 4).save(tmp_path / "in.png")
    assert main(["reconstruct", "--model", str(tmp_path / "kl" / "model.ckpt"), "--image", str(tmp_path / "in.png"),
                 "-o", str(tmp_path / "rec.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    (tmp_path / "many").mkdir()
    for k in range(2):
        _rng_image(32, 10 + k).save(tmp_path / "many" / f"{k}.png")
    assert main(["reconstruct", "--model", str(tmp_path / "kl" / "model.ckpt"), "--image", str(tmp_path / "many"),
                 "-o", str(tmp_path / "recs")]) == 0
    assert "mean PSNR" in capsys.readouterr().out and sorted(p.name for p in (tmp_path / "recs").iterdir()) == [
        "0.png", "1.png"]
    with Image.open(tmp_path / "rec.png") as reconstruction:
        assert reconstruction.size == (32, 32)

    ckpt = zoo.ckpt("celeba256")
    assert main(["convert", "--model", str(ckpt), "-o", str(tmp_path / "c.safetensors")]) == 0
    settings = dataclasses.replace(DDIM, steps=2)
    a = Pipeline(load_model(ckpt)).unconditional([SampleSpec(seed=1)], settings).images[0]
    b = Pipeline(load_model(tmp_path / "c.safetensors")).unconditional([SampleSpec(seed=1)], settings).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_eval_scores_a_first_stage_on_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ldm eval --model kl/model.ckpt --images DIR`: PSNR and SSIM per image and their means (report.json with
    --out), each equal to the measure of that image's reconstruction; LPIPS only with both local weight files."""
    import torch

    from models.autoencoder import Autoencoder
    from models.compvis.first_stage import first_stage_from_yaml, load_first_stage, psnr, reconstruct
    from models.eval.reconstruction import ssim
    from models.train.losses import LPIPS
    from tests.helpers import randomize

    (tmp_path / "kl").mkdir()
    (tmp_path / "kl" / "config.yaml").write_text(FIRST_STAGE_KL_F8, encoding="utf-8")
    sd = randomize(Autoencoder(first_stage_from_yaml(tmp_path / "kl" / "config.yaml")), 1).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "kl" / "model.ckpt")
    (tmp_path / "images").mkdir()
    for k in range(2):
        _rng_image(16, 20 + k).save(tmp_path / "images" / f"{k}.png")
    ckpt = str(tmp_path / "kl" / "model.ckpt")
    assert main(["eval", "--model", ckpt, "--images", str(tmp_path / "images"), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    autoencoder = load_first_stage(tmp_path / "kl" / "model.ckpt", tmp_path / "kl" / "config.yaml")
    originals = [Image.open(tmp_path / "images" / f"{k}.png").convert("RGB") for k in range(2)]
    rebuilt = [reconstruct(autoencoder, im) for im in originals]
    want = [v for im, re in zip(originals, rebuilt, strict=True) for v in (psnr(im, re), ssim(im, re))]
    got = [row[k] for row in report["per_image"] for k in ("psnr", "ssim")]
    assert got == pytest.approx(want) and report["mean"]["psnr"] == pytest.approx((want[0] + want[2]) / 2)
    assert report["mean"]["lpips"] is None and "needs --vgg-weights and --lpips-weights" in out

    reference = randomize(LPIPS(), 2)
    reference.shift, reference.scale = LPIPS().shift, LPIPS().scale  # constants of LPIPS, not weights of the files
    torch.save({f"features.{k}": v for k, v in reference.features.state_dict().items()}, tmp_path / "vgg.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(reference.lins)}, tmp_path / "lin.pth")
    assert main(["eval", "--model", ckpt, "--images", str(tmp_path / "images"), "--vgg-weights",
                 str(tmp_path / "vgg.pth"), "--lpips-weights", str(tmp_path / "lin.pth"), "--out",
                 str(tmp_path / "r2")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "r2" / "report.json").read_text())["per_image"]
    from models.images import to_tensor

    with torch.no_grad():
        lpips = [float(reference(to_tensor([im]), to_tensor([reconstruct(autoencoder, im)]))[0]) for im in originals]
    assert [row["lpips"] for row in rows] == pytest.approx(lpips, rel=1e-5) and min(lpips) > 0
    assert main(["eval", "--model", ckpt, "--images", str(tmp_path / "images"), "--lpips-weights",
                 str(tmp_path / "lin.pth")]) == 2
    assert "both --vgg-weights" in capsys.readouterr().err


def test_img2img_with_a_prompt(tmp_path: Path, zoo: ZooFiles) -> None:
    """`--task img2img --image --strength` with a prompt, on the zoo's text model (SDEdit, models/pipeline.py)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    ckpt = zoo.ckpt("text2img256")
    image = _rng_image(32, 5)
    image.save(tmp_path / "in.png")
    got = _run(tmp_path, "a fox", "--model", ckpt, "--tokenizer", tok, "--task", "img2img",
               "--image", tmp_path / "in.png", "--strength", "0.5", "--guidance", "2.0")
    model = load_model(ckpt, tokenizer_dir=tok)
    settings = dataclasses.replace(DDIM, strength=0.5)
    want = Pipeline(model).img2img([SampleSpec(prompt="a fox", seed=SEED, guidance_scale=2.0)], settings, [image])
    assert_close_images(got, np.asarray(want.images[0]))
    with pytest.raises(SystemExit, match="--image and --mask are for --task img2img, inpaint or upscale"):
        main(["generate", "a fox", "--model", str(ckpt), "--image", str(tmp_path / "in.png")])
