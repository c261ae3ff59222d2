"""Textual-inversion embeddings: every file layout loads (files written here), and a prompt naming one gets the
conditioning of its vectors put in place of the name's token embeddings by hand."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.prompt_weighting import CHUNK, encode_prompt
from models.text.clip import CLIPTextConditioner, CLIPTextConfig
from models.textual_inversion import SINGLE, Embedding, EmbeddingDB, EmbeddingError, load_embeddings, read_embedding
from models.tokenizers import CLIPTokenizer
from tests.helpers import randomize, write_clip_tokenizer

D = 64


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> CLIPTextConditioner:
    tokenizer = CLIPTokenizer.from_dir(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=D, intermediate_size=128, num_layers=2,
                            num_heads=2)
    return randomize(CLIPTextConditioner(config, tokenizer), seed=5)


def vectors(n: int, seed: int, width: int = D) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embeddings")
    torch.save({"string_to_param": {"*": vectors(2, 1)}, "name": "ignored", "step": 500}, root / "two-vec.pt")
    save_file({"emb_params": vectors(1, 2)}, str(root / "one-vec.safetensors"))
    torch.save({"<cat-toy>": vectors(1, 3)[0]}, root / "learned_embeds.bin")
    (root / "sub").mkdir()
    save_file({"clip_l": vectors(2, 4, 768), "clip_g": vectors(2, 5, 1280)}, str(root / "sub" / "xl.safetensors"))
    return root


def test_every_layout_loads(folder: Path) -> None:
    two = read_embedding(folder / "two-vec.pt")
    assert two.names == ("two-vec", "<two-vec>") and torch.equal(two.vectors[SINGLE], vectors(2, 1))
    assert read_embedding(folder / "one-vec.safetensors").count == 1
    diffusers = read_embedding(folder / "learned_embeds.bin")
    assert "<cat-toy>" in diffusers.names and diffusers.vectors[SINGLE].shape == (1, D)
    xl = read_embedding(folder / "sub" / "xl.safetensors")  # SDXL: one vector set per text encoder
    assert {k: tuple(v.shape) for k, v in xl.vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    bad = folder.parent / "bad.safetensors"
    save_file({"something": torch.zeros(3)}, str(bad))
    save_file({"a": torch.zeros(3), "b": torch.zeros(3)}, str(bad))
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding"):
        read_embedding(bad)


def test_a_prompt_naming_embeddings_gets_their_vectors_in_place(encoder: CLIPTextConditioner, folder: Path) -> None:
    tok = encoder.tokenizer
    assert tok is not None
    db = load_embeddings(folder, D, tok.encode)
    assert len(db) == 3 and db.skipped and "xl" in db.skipped[0]  # the SDXL file is not for this encoder
    a, dog = tok.encode("a"), tok.encode("dog")
    body = [*a, 0, 0, *dog, 0]  # two-vec takes two positions, <cat-toy> one
    ids = [tok.bos_id, *body, tok.eos_id, *[tok.pad_id] * (CHUNK - len(body))]
    model = encoder.transformer.text_model
    with torch.inference_mode():
        x = model.embeddings.token_embedding(torch.tensor([ids]))
        start = 1 + len(a)
        x[0, start : start + 2] = vectors(2, 1)
        x[0, start + 2 + len(dog)] = vectors(1, 3)[0]
        x = x + model.embeddings.position_embedding(torch.arange(len(ids)))[None]
        expected = model.final_layer_norm(model.encoder(x))
        got, warnings = encode_prompt(encoder, "a two-vec dog <cat-toy>", embeddings=db)
        plain, _ = encode_prompt(encoder, "a two-vec dog <cat-toy>", syntax="plain", embeddings=db)
        weighted, _ = encode_prompt(encoder, "a (two-vec:1.3) dog <cat-toy>", embeddings=db)
    assert warnings == [] and torch.allclose(got, expected, atol=1e-5) and torch.allclose(plain, expected, atol=1e-5)
    w = torch.ones(77)
    w[start : start + 2] = 1.3  # an embedding's positions take its text's weight
    scaled = expected * w[None, :, None]
    assert torch.allclose(weighted, scaled * (expected.mean() / scaled.mean()), atol=1e-5)


def test_longest_name_first_and_whole_tokens_only(encoder: CLIPTextConditioner) -> None:
    """`<style>` matches as one name (all its tokens), and a word that merely contains the name does not."""
    tok = encoder.tokenizer
    assert tok is not None
    db = EmbeddingDB(D)
    db.add(Embedding(("style", "<style>"), {SINGLE: vectors(1, 7)}), tok.encode)
    found = db.find(tok.encode("<style>"), 0)
    assert found is not None and found[1] == len(tok.encode("<style>")) > 1
    word = tok.encode("restyled")
    assert all(db.find(word, i) is None for i in range(len(word)))
