"""A1111 prompt syntax: the worked examples of its documentation, chunking and the weighted encoding,
with expected values computed here from the documented rules."""

from pathlib import Path

import pytest
import torch

from models.prompt_weighting import CHUNK, Chunk, PromptSyntaxError, chunk_prompt, encode_weighted, parse_emphasis
from models.text.clip import CLIPTextConditioner, CLIPTextConfig
from models.tokenizers import CLIPTokenizer
from tests.helpers import randomize, write_clip_tokenizer

E = 1.1


@pytest.mark.parametrize(("prompt", "expected"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", E), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", E)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"back\slash", [("backslash", 1.0)]),  # A1111 drops a backslash before anything else
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", E)]),
    # the third "(" is never closed, so it applies to the end of the prompt
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * E * E), (" ", E), ("on", 1.0), (" a ", E), ("hill", 0.5 * E), (", sun, ", E),
      ("sky", E**4), (".", E)]),
    ("[[faint]] plain", [("faint", 1 / E / E), (" plain", 1.0)]),
    ("ratio 16:9 (x:2)", [("ratio 16:9 ", 1.0), ("x", 2.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", E), ("BREAK", -E), ("b", E)]),
    ("", [("", 1.0)]),
])
def test_emphasis_worked_examples(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def _chunks(prompt: str, tokenizer: CLIPTokenizer) -> list[Chunk]:
    return chunk_prompt(prompt, tokenizer)[0]


def _body(chunk_ids: list[int], tokenizer: CLIPTokenizer) -> list[int]:
    return [i for i in chunk_ids[1:-1] if i != tokenizer.pad_id]


def test_chunks_of_75_with_comma_backtrack(tokenizer: CLIPTokenizer) -> None:
    cat, comma = tokenizer.encode("cat"), tokenizer.encode(",")
    assert len(cat) == 1 and len(comma) == 1
    two = _chunks("cat " * 80, tokenizer)
    assert [len(c.ids) for c in two] == [CHUNK + 2] * 2
    assert _body(two[0].ids, tokenizer) == cat * 75 and _body(two[1].ids, tokenizer) == cat * 5
    assert two[0].ids[0] == tokenizer.bos_id and two[1].ids[-1] == tokenizer.eos_id
    # a comma among the last 20 tokens of a full chunk: what follows it moves to the next chunk
    near = _chunks("cat " * 70 + ", " + "cat " * 10, tokenizer)
    assert _body(near[0].ids, tokenizer) == cat * 70 + comma and _body(near[1].ids, tokenizer) == cat * 10
    far = _chunks("cat " * 50 + ", " + "cat " * 30, tokenizer)
    assert _body(far[0].ids, tokenizer) == cat * 50 + comma + cat * 24
    broken = _chunks("cat BREAK cat", tokenizer)
    assert [_body(c.ids, tokenizer) for c in broken] == [cat, cat]
    assert len(_chunks("", tokenizer)) == 1


def test_weighted_encoding_follows_the_documented_rule(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    """Each token's state times its weight, then the chunk rescaled to its unweighted mean."""
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=2)
    encoder = randomize(CLIPTextConditioner(config, tokenizer), seed=3)
    cat, dog = tokenizer.encode("cat"), tokenizer.encode("dog")
    ids = [tokenizer.bos_id, *cat, *dog, *[tokenizer.pad_id] * (CHUNK - len(cat) - len(dog)), tokenizer.eos_id]
    weights = torch.ones(77)
    weights[1 : 1 + len(cat)] = 1.5
    weights[1 + len(cat) : 1 + len(cat) + len(dog)] = 1 / E
    with torch.inference_mode():
        z = encoder.transformer(torch.tensor([ids]))
        expected = z * weights[None, :, None]
        expected = expected * (z.mean() / expected.mean())
        got = encode_weighted(encoder, "(cat:1.5) [dog]")
        assert torch.allclose(got, expected, atol=1e-6)
        plain = encode_weighted(encoder, "cat dog")
        assert torch.allclose(plain, encoder.encode(["cat dog"]).context, atol=1e-6)  # no syntax: as before
        long = encode_weighted(encoder, "cat " * 80)
        assert long.shape == (1, 2 * 77, 64)
        assert torch.allclose(long[:, 77:], encoder.encode(["cat " * 5]).context, atol=1e-6)


def test_sd2_chunks_pad_after_one_end_token(tmp_path: Path) -> None:
    """SD 2's encoder pads with its own token: A1111 keeps the first end token and pads after it
    (sd_hijack_clip.process_tokens), as the plain tokenizer does."""
    sd2 = CLIPTokenizer.from_dir(write_clip_tokenizer(tmp_path / "tok"), pad_token="!")
    assert sd2.pad_id != sd2.eos_id
    cat = sd2.encode("cat")
    (chunk,), _ = chunk_prompt("cat", sd2)
    assert chunk.ids == [sd2.bos_id, *cat, sd2.eos_id, *[sd2.pad_id] * (CHUNK - len(cat))]
    assert chunk.ids == sd2.tokenize(["cat"]).ids[0].tolist()


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5] here", "[dog:10]", "a [cat|dog]", "a cat AND a dog"])
def test_prompt_editing_alternation_and_composition_are_refused(prompt: str, tokenizer: CLIPTokenizer) -> None:
    from models.prompt_weighting import check_supported

    with pytest.raises(PromptSyntaxError, match="not supported"):
        check_supported(prompt)
    check_supported(prompt.replace("[", "\\[").replace("]", "\\]").replace("AND", "and"))  # escaped: text


def test_plain_syntax_is_the_text_as_is_truncated(tokenizer: CLIPTokenizer) -> None:
    chunks, warnings = chunk_prompt("(cat:1.5) " + "dog " * 80, tokenizer, syntax="plain")
    assert len(chunks) == 1 and set(chunks[0].weights) == {1.0} and "truncated" in warnings[0]
    assert chunks[0].ids[1:4] == tokenizer.encode("(cat:1.5)")[:3]


def test_a1111_mean_is_taken_per_chunk_of_a_long_prompt(tokenizer: CLIPTokenizer) -> None:
    """Two chunks (BREAK): each is encoded alone, weighted and rescaled to its own unweighted mean."""
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=2)
    encoder = randomize(CLIPTextConditioner(config, tokenizer), seed=4)
    cat, dog = tokenizer.encode("cat"), tokenizer.encode("dog")

    def expected_chunk(ids: list[int], weight: float) -> torch.Tensor:
        full = [tokenizer.bos_id, *ids, tokenizer.eos_id, *[tokenizer.pad_id] * (CHUNK - len(ids))]
        z = encoder.transformer(torch.tensor([full]))
        w = torch.ones(77)
        w[1 : 1 + len(ids)] = weight
        weighted = z * w[None, :, None]
        return weighted * (z.mean() / weighted.mean())

    with torch.inference_mode():
        got = encode_weighted(encoder, "((cat)) BREAK [dog]")
        expected = torch.cat([expected_chunk(cat, E * E), expected_chunk(dog, 1 / E)], dim=1)
    assert got.shape == (1, 154, 64)
    assert torch.allclose(got, expected, atol=1e-6)
