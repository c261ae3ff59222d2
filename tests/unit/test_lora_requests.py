"""LoRA names and A1111 prompt tags at admission (torch-free, service/loras.py and service/schemas.py), and their
gRPC conversion."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api import proto_build
from service.config import Settings
from service.loras import LoraNameError, available_loras, lora_path, split_lora_tags
from service.schemas import GenerationRequest, Task, admit

proto_build.ensure()

from service.api._proto.ldm.v1 import ldm_pb2 as pb  # noqa: E402
from service.api.grpc.convert import to_parameters, to_request  # noqa: E402


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("style", "other one"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    (tmp_path.parent / "outside.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(tmp_path.parent / "outside.safetensors")
    return tmp_path


def test_names_resolve_inside_the_folder_only(folder: Path) -> None:
    assert lora_path(folder, "style") == (folder / "style.safetensors").resolve()
    assert lora_path(folder, "other one").name == "other one.safetensors"
    assert available_loras(folder) == ["link", "other one", "style"]
    for name, message in (("nope", "unknown LoRA 'nope'"), ("../outside", "not a name"), ("a/b", "not a name"),
                          ("link", "unknown LoRA 'link'"), ("x..y", "not a name")):
        with pytest.raises(LoraNameError, match=message):
            lora_path(folder, name)
    with pytest.raises(LoraNameError, match="LDM_LORA_DIR is unset"):
        lora_path(None, "style")


def test_a1111_tags_are_taken_out_of_the_prompt() -> None:
    assert split_lora_tags("a <lora:style:0.6> cat, <lora:b>") == ("a  cat, ", [("style", 0.6), ("b", 1.0)])
    for tag, message in (("<hypernet:x:1>", "only <lora:name:weight>"), ("<lora:x:0.5:1>", "separate"),
                         ("<lora:x:big>", "not a number")):
        with pytest.raises(ValueError, match=message):
            split_lora_tags(f"a {tag}")


def test_admission_moves_tags_into_loras_and_names_unknown_adapters(folder: Path) -> None:
    settings = Settings(lora_dir=folder, max_loras=2)
    admitted = admit(GenerationRequest(prompt="a cat <lora:style:0.7>", loras=[{"name": "other one"}]), settings)
    assert admitted.prompt == "a cat " and [(r.name, r.weight) for r in admitted.loras] == [("other one", 1.0),
                                                                                           ("style", 0.7)]
    plain = admit(GenerationRequest(prompt="a cat <lora:style:0.7>"), Settings(lora_dir=folder, prompt_syntax="plain"))
    assert plain.prompt == "a cat <lora:style:0.7>" and plain.loras == ()  # plain syntax: the text as is
    with pytest.raises(ValidationError) as err:
        admit(GenerationRequest(prompt="<lora:a><lora:b><lora:style>", loras=[{"name": "ghost"}]), settings)
    text = str(err.value)
    assert "unknown LoRA 'ghost'" in text and "unknown LoRA 'a'" in text and "at most 2 LoRA adapters" in text
    with pytest.raises(ValidationError, match="takes no LoRA adapters"):
        admit(GenerationRequest(task=Task.unconditional, loras=[{"name": "style"}]), settings)
    with pytest.raises(ValidationError, match="weight"):
        GenerationRequest(loras=[{"name": "style", "weight": 11}])


def test_grpc_loras_round_trip() -> None:
    params = pb.GenerationParameters(prompt="x", loras=[pb.Lora(name="style", weight=0.5), pb.Lora(name="b")])
    request = to_request(params, Task.txt2img)
    assert [(r.name, r.weight) for r in request.loras] == [("style", 0.5), ("b", 1.0)]
    back = to_parameters(request.model_copy(update={"seed": 1, "model": "m"}))
    assert [(lora.name, lora.weight) for lora in back.loras] == [("style", 0.5), ("b", 1.0)]
