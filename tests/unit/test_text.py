"""Conditioners: CLIP and MiniLM against transformers on the same weights, and the contracts every
conditioner keeps (context shapes, truncation warnings that reach the caller, checkpoint key names)."""

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.class_conditioner import ClassConditioner
from models.conditioners import ConditionerConfig, build_conditioner
from models.text.clip import CLIPTextConditioner, CLIPTextConfig, CLIPTextModel, MissingTokenizerError
from models.text.minilm import MiniLMConditioner
from models.text.transformer import TransformerConditioner, TransformerTextConfig
from models.tokenizers import BOS, EOS, CLIPTokenizer, bytes_to_unicode, minilm_model_dir

TINY_CLIP = CLIPTextConfig(vocab_size=600, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4)
TINY_TAU = TransformerTextConfig(width=32, depth=2, heads=4)
EAGER: dict[str, Any] = {"attn_implementation": "eager"}  # transformers' attention path, independent of SDPA


def byte_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """CLIP's byte-level vocabulary with no merges (514 tokens): enough to exercise the conditioner."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), BOS, EOS]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, [], max_length=max_length)


def randomize_(module: nn.Module, seed: int) -> None:
    """Random weights with sane scales (LayerNorm weights near 1, matrices ~ 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def clip_parity_error(config: CLIPTextConfig, batch: int) -> float:
    """Max |ours - transformers CLIPTextModel| of last_hidden_state for one random state dict (fp32)."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    ours = CLIPTextModel(config).eval()
    randomize_(ours, seed=0)
    vocab = config.vocab_size
    hf_config = HFConfig(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        **EAGER,
    )
    theirs = HFModel(hf_config).eval()
    # transformers 5 flattens CLIPTextModel (no `text_model.`); SD checkpoints use the old names, as we do
    flat = {k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(flat, strict=True)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, config.max_positions), generator=generator)
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (batch, config.max_positions, config.hidden_size)
    return float((got - expected).abs().max())


def test_clip_parity_small() -> None:
    assert clip_parity_error(TINY_CLIP, batch=3) < 1e-4


@pytest.mark.slow
def test_clip_parity_sd_v1_size() -> None:
    start = time.perf_counter()
    assert clip_parity_error(CLIPTextConfig(), batch=2) < 1e-4
    print(f"full-size CLIP parity: {time.perf_counter() - start:.1f} s")


def test_clip_sd_v1_parameter_count_and_keys() -> None:
    with torch.device("meta"):
        cond = CLIPTextConditioner()
    assert sum(p.numel() for p in cond.parameters()) == 123_060_480
    keys = set(cond.state_dict())
    p = "transformer.text_model."
    assert f"{p}embeddings.token_embedding.weight" in keys
    assert f"{p}embeddings.position_embedding.weight" in keys
    assert f"{p}final_layer_norm.bias" in keys
    layer = f"{p}encoder.layers.11."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
        assert {f"{layer}{name}.weight", f"{layer}{name}.bias"} <= keys
    assert len(keys) == 2 + 12 * 16 + 2
    assert not any(k.endswith("position_ids") for k in keys)


def test_clip_loads_checkpoint_keys_with_position_ids() -> None:
    source = CLIPTextConditioner(TINY_CLIP)
    randomize_(source, seed=2)
    ckpt = {f"cond_stage_model.{k}": v for k, v in source.state_dict().items()}
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    stripped = {k.removeprefix("cond_stage_model."): v for k, v in ckpt.items()}
    with torch.device("meta"):  # how the checkpoint loader builds models
        target = CLIPTextConditioner(TINY_CLIP)
    target.load_state_dict(stripped, strict=True, assign=True)
    ids = torch.randint(0, 600, (2, 77))
    assert torch.equal(target.transformer(ids), source.transformer(ids))
    fresh = CLIPTextConditioner(TINY_CLIP)
    fresh.load_state_dict(stripped, strict=True)  # and without assign


def test_clip_conditioner_without_tokenizer_says_what_to_do() -> None:
    cond = CLIPTextConditioner(TINY_CLIP)
    with pytest.raises(MissingTokenizerError, match=r"--tokenizer DIR.*vocab\.json and merges\.txt"):
        cond.encode(["a cat"])


def test_clip_conditioner_encode_and_truncation(caplog: pytest.LogCaptureFixture) -> None:
    cond = CLIPTextConditioner(TINY_CLIP, byte_clip_tokenizer())
    assert not any(p.requires_grad for p in cond.parameters())
    with caplog.at_level(logging.DEBUG, logger="models.tokenizers"):
        out = cond.encode(["", "a cat", "x" * 100])
    assert out.context.shape == (3, 77, 64) and cond.context_dim == 64
    assert out.warnings == [w for w in out.warnings if w.startswith("prompt 2 truncated to 77 tokens")]
    assert len(out.warnings) == 1 and out.warnings[0] in caplog.text
    alone = cond.encode(["a cat"]).context
    torch.testing.assert_close(alone[0], out.context[1], atol=1e-5, rtol=0)  # batch-independent


def test_clip_conditioner_rejects_a_tokenizer_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        CLIPTextConditioner(CLIPTextConfig(vocab_size=100, hidden_size=64, num_layers=1, num_heads=4),
                            byte_clip_tokenizer())


@pytest.fixture(scope="module")
def minilm() -> MiniLMConditioner:
    return MiniLMConditioner(max_length=24)


def test_minilm_matches_transformers(minilm: MiniLMConditioner) -> None:
    from transformers import BertModel as HFBertModel

    prompts = ["a photograph of an astronaut riding a horse", "", "Hello, WORLD! café 東京 🚀 3.14"]
    theirs = HFBertModel.from_pretrained(str(minilm_model_dir()), local_files_only=True).eval()
    tokens = minilm.tokenizer.tokenize(prompts)
    with torch.no_grad():
        expected = theirs(input_ids=tokens.ids, attention_mask=tokens.attention_mask).last_hidden_state
        got = minilm.encode(prompts).context
    assert got.shape == (3, 24, 384)
    assert float((got - expected).abs().max()) < 1e-4


def test_minilm_is_frozen_and_reports_truncation(minilm: MiniLMConditioner) -> None:
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.bert.training
    out = minilm.encode(["word " * 30])
    assert out.context.shape == (1, 24, 384) and minilm.context_dim == 384
    dropped = " ".join(["word"] * 8)
    assert out.warnings == [f"prompt 0 truncated to 24 tokens: dropped 8 token(s) '{dropped}'"]


def test_minilm_builds_on_meta_device_with_real_weights() -> None:
    with torch.device("meta"):
        cond = MiniLMConditioner(max_length=8)
    assert not any(p.is_meta for p in cond.parameters())


def test_transformer_conditioner() -> None:
    cond = TransformerConditioner(TINY_TAU)
    out = cond.encode(["a cat", "word " * 100])
    assert out.context.shape == (2, 77, 32) and cond.context_dim == 32
    assert len(out.warnings) == 1 and out.warnings[0].startswith("prompt 1 truncated to 77 tokens")
    out.context.square().mean().backward()  # trained from scratch: gradients reach the embeddings
    assert cond.transformer.token_emb.weight.grad is not None
    assert {"transformer.token_emb.weight", "transformer.pos_emb.weight", "transformer.norm.weight",
            "transformer.blocks.1.attn.to_q.weight"} <= set(cond.state_dict())
    assert "transformer.blocks.0.attn.to_q.bias" not in cond.state_dict()


def test_transformer_conditioner_rejects_a_tokenizer_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        TransformerConditioner(TransformerTextConfig(vocab_size=1000, width=32, depth=1, heads=4))


def test_class_conditioner() -> None:
    cond = ClassConditioner(n_classes=10, dim=16)
    out = cond.encode([0, 3, cond.null_class])
    assert out.context.shape == (3, 1, 16) and out.warnings == []
    assert torch.equal(out.context[2, 0], cond.embedding.weight[10])
    assert torch.equal(cond.encode(torch.tensor([3])).context, out.context[1:2])
    assert {k: tuple(v.shape) for k, v in cond.state_dict().items()} == {"embedding.weight": (11, 16)}
    for bad in ([11], [-1], ["11"]):
        with pytest.raises(ValueError, match="0..10"):
            cond.encode(bad)
    as_text = cond.encode(["0", " 3 ", ""])  # the prompt interface: a class index, "" = null class
    assert torch.equal(as_text.context, out.context)
    with pytest.raises(ValueError, match="class index 0..9"):
        cond.encode(["a cat"])


def test_build_conditioner(tmp_path: Path) -> None:
    clip = build_conditioner(ConditionerConfig(kind="clip", clip=TINY_CLIP))
    assert isinstance(clip, CLIPTextConditioner) and clip.tokenizer is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_conditioner(ConditionerConfig(kind="clip", clip=TINY_CLIP), tmp_path)

    tau = build_conditioner(ConditionerConfig(kind="transformer", transformer=TINY_TAU), minilm_model_dir())
    assert isinstance(tau, TransformerConditioner) and tau.context_dim == 32

    labels = ConditionerConfig(kind="class", n_classes=10, class_dim=16)
    assert isinstance(build_conditioner(labels), ClassConditioner) and labels.context_dim == 16
    with pytest.raises(ValueError, match="no tokenizer folder"):
        build_conditioner(labels, tmp_path)
    assert ConditionerConfig(kind="minilm").context_dim == 384
    assert ConditionerConfig().context_dim == 768
    with pytest.raises(ValueError, match="kind"):
        ConditionerConfig(kind="t5")  # type: ignore[arg-type]


def test_build_clip_conditioner_with_tokenizer_folder(tmp_path: Path) -> None:
    import json

    tok = byte_clip_tokenizer()
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    cond = build_conditioner(ConditionerConfig(kind="clip", clip=TINY_CLIP), tmp_path)
    assert isinstance(cond, CLIPTextConditioner) and cond.tokenizer is not None
    assert cond.encode(["a cat"]).context.shape == (1, 77, 64)
