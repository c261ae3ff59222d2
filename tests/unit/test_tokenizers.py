"""Tokenizers: our CLIP BPE against transformers' CLIPTokenizer on a BPE vocabulary trained here, and the
MiniLM WordPiece wrapper against transformers' BertTokenizer on the packaged tokenizer.json."""

import collections
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from models.tokenizers import (
    BOS,
    EOS,
    BertTokenizer,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    minilm_model_dir,
)

CORPUS = """
A photograph of an astronaut riding a horse on the moon. A painting of a castle in the mountains at
sunset, highly detailed, trending on artstation. It's a dog's life; they're happy, we've been there,
I'm sure you'll see what he'd do. The quick brown fox jumps over the lazy dog. Portrait of a woman
with red hair, oil on canvas, by a famous painter. A cat sitting on a windowsill watching the rain.
Numbers like 1999, 2024 and 3.14 appear in prompts too. Café au lait, naïve art, über cool, jalapeño.
A beautiful landscape with rivers, forests and lakes; photorealistic, 8k, cinematic lighting.
An old man reading a newspaper in a crowded train station, black and white photography.
Science fiction city with flying cars and neon lights, cyberpunk style, digital art.
Watercolor illustration of flowers in a vase; still life; soft colors; morning light.
"""


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """A tiny BPE trainer in CLIP's format: byte-mapped symbols, `</w>` on a word's last symbol,
    repeatedly merge the most frequent adjacent pair (ties: the smallest pair, for determinism)."""
    enc = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", text.lower()))
    split = {w: [*[enc[b] for b in w.encode()][:-1], enc[w.encode()[-1]] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, count in words.items():
            for pair in zip(split[w], split[w][1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out
    return merges


def write_clip_tokenizer(folder: Path, n_merges: int = 300) -> Path:
    """vocab.json + merges.txt laid out like CLIP's: bytes, bytes + `</w>`, merges, then the specials."""
    chars = list(bytes_to_unicode().values())
    merges = train_bpe(CORPUS, n_merges)
    tokens = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


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
    with caplog.at_level(logging.WARNING, logger="models.tokenizers"):
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
