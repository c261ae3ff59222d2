"""Tokenizers: our CLIP BPE against transformers' CLIPTokenizer on a BPE vocabulary trained here, and the
MiniLM WordPiece wrapper against transformers' BertTokenizer on the packaged tokenizer.json."""

import json
import logging
from pathlib import Path

import pytest
import torch

from models.tokenizers import (
    BertTokenizer,
    CLIPTokenizer,
    clean_text,
    minilm_model_dir,
)
from tests.helpers import CORPUS, train_bpe, write_clip_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A  PHOTO\tof a Cat!!!\n 123 4567 and 3.14, 1,000,000",
    "it's a dog's life, isn't it? they're we've I'm you'll he'd 'quoted' ''s",
    "café naïve über jalapeño e\u0301 Straße ΑΘΗΝΑ σοφος",
    "東京 タワー 🚀🔥 emoji… — dashes – and ‘curly’ “quotes”",
    "hello,world.foo/bar-baz_qux (parens) [brackets] {braces} #hash @at $5 %50 ^ * ~",
    "   leading and trailing spaces   ",
    "",
    "tabs\tand\u00a0non-breaking\u2003spaces",
    "a cat <|endoftext|> a dog",
    "trending on artstation, highly detailed, 8k, cinematic lighting, by greg rutkowski",
    "a very detailed painting of a castle in the mountains at sunset " * 8,
]


def test_clip_matches_transformers(clip_dir: Path) -> None:
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    ours = CLIPTokenizer.from_dir(clip_dir)
    theirs = HFCLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    expected = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = ours.tokenize(PROMPTS)
    assert got.ids.shape == (len(PROMPTS), 77)
    for i, prompt in enumerate(PROMPTS):
        assert got.ids[i].tolist() == expected["input_ids"][i].tolist(), prompt
    assert torch.equal(got.attention_mask, expected["attention_mask"])
    assert ours.vocab_size == len(theirs)


def test_clip_reads_a_tokenizer_json_folder(clip_dir: Path, tmp_path: Path) -> None:
    """transformers >= 5 saves a CLIP tokenizer as tokenizer.json only (no vocab.json / merges.txt)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    HFCLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    assert torch.equal(CLIPTokenizer.from_dir(tmp_path).tokenize(PROMPTS).ids,
                       CLIPTokenizer.from_dir(clip_dir).tokenize(PROMPTS).ids)


def test_clip_merges_are_used(clip_dir: Path) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    ids = tok.encode("a photograph of the horse")
    assert len(ids) < len("aphotographofthehorse")  # trained merges shorten common words
    assert tok.decode(ids) == "a photograph of the horse"


def test_clip_layout(clip_dir: Path) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    out = tok.tokenize(["", "a cat"])
    assert out.ids.dtype == torch.long and out.ids.shape == (2, 77)
    assert out.ids[0, :2].tolist() == [tok.bos_id, tok.eos_id]
    assert tok.pad_id == tok.eos_id  # SD v1: pad = eos = <|endoftext|>
    assert (out.ids[0, 2:] == tok.pad_id).all()
    assert out.attention_mask[0].tolist() == [1, 1] + [0] * 75
    assert out.warnings == []
    assert tok.tokenize([]).ids.shape == (0, 77)


def test_clip_truncation_reported(clip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir, max_length=8)
    with caplog.at_level(logging.DEBUG, logger="models.tokenizers"):
        out = tok.tokenize(["a cat", "a painting of a castle in the mountains at sunset"])
    assert out.ids.shape == (2, 8) and out.ids[1, -1].item() == tok.eos_id
    assert out.attention_mask[1].tolist() == [1] * 8
    assert len(out.warnings) == 1
    message = out.warnings[0]
    assert message.startswith("prompt 1 truncated to 8 tokens")
    assert message.endswith("'the mountains at sunset'")
    assert message in caplog.text


def test_clip_clean_text() -> None:
    assert clean_text("  Fish &amp;amp; Chips\n\tNOW ") == "fish & chips now"  # double unescape, as CLIP
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    # Python's str.lower, as OpenAI CLIP: final sigma (HF's tokenizers backend lower-cases per character)
    assert clean_text("ΣΟΦΟΣ") == "σοφος"


def test_clip_special_tokens_map(clip_dir: Path, tmp_path: Path) -> None:
    folder = write_clip_tokenizer(tmp_path / "sd2", n_merges=10)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    tok = CLIPTokenizer.from_dir(folder)
    assert tok.pad_id == tok.encoder["!"] != tok.eos_id


def test_clip_missing_files(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt") as info:
        CLIPTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value) and "vocab.json" in str(info.value)


BERT_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Hello, WORLD!!! It's 3.14 o'clock; café naïve über 東京 🚀",
    "",
    "unbelievably hyperrealistic photogrammetry",
    "word " * 100,
]


def test_bert_matches_transformers() -> None:
    from transformers import AutoTokenizer

    ours = BertTokenizer.from_package(max_length=32)
    theirs = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    expected = theirs(BERT_PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    got = ours.tokenize(BERT_PROMPTS)
    assert torch.equal(got.ids, expected["input_ids"])
    assert torch.equal(got.attention_mask, expected["attention_mask"])
    assert ours.vocab_size == 30522
    assert len(got.warnings) == 1 and got.warnings[0].startswith("prompt 4 truncated to 32 tokens")


def test_bert_layout() -> None:
    tok = BertTokenizer.from_package(max_length=6)
    out = tok.tokenize(["A B", "one two three four five"])
    assert out.ids[0].tolist()[:4] == [tok.cls_id, tok.encode("a")[0], tok.encode("b")[0], tok.sep_id]
    assert out.ids[0, 4:].tolist() == [tok.pad_id] * 2
    assert out.ids[1, -1].item() == tok.sep_id
    assert out.warnings == ["prompt 1 truncated to 6 tokens: dropped 1 token(s) 'five'"]


def test_bert_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BertTokenizer(tmp_path / "tokenizer.json")
