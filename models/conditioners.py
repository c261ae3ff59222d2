"""Which conditioner a model has, and building it: `ConditionerConfig` (part of every model config) and
`build_conditioner`.

The kinds live in their own modules: text encoders in models/text/ (clip, minilm, transformer), class labels in
models/class_conditioner.py, layouts and semantic maps in models/conditioning.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from models.class_conditioner import ClassConditioner
from models.compvis.bert import BERTConditioner, BERTEmbedderConfig
from models.compvis.boxes import BoxTokenConditioner, BoxTokensConfig
from models.compvis.rescaler import SpatialRescaler, SpatialRescalerConfig
from models.conditioning import (
    LayoutEncoder,
    LayoutEncoderConfig,
    SemanticEncoder,
    SemanticEncoderConfig,
)
from models.names import normalise_name
from models.text.clip import CLIPTextConditioner, CLIPTextConfig
from models.text.minilm import BertConfig, MiniLMConditioner
from models.text.sdxl import SDXLTextConditioner, SDXLTextConfig
from models.text.transformer import TransformerConditioner, TransformerTextConfig
from models.tokenizers import BertTokenizer, CLIPTokenizer

ConditionerKind = Literal["clip", "minilm", "transformer", "class", "layout", "semantic", "bert", "rescaler",
                          "box_tokens", "sdxl"]
AnyConditioner = (CLIPTextConditioner | MiniLMConditioner | TransformerConditioner | ClassConditioner
                  | LayoutEncoder | SemanticEncoder | BERTConditioner | SpatialRescaler | BoxTokenConditioner
                  | SDXLTextConditioner)


@dataclass(frozen=True)
class ConditionerConfig:
    """Which conditioner, and its size. Only the fields of the chosen kind are used: clip -> `clip`; sdxl -> `sdxl`;
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
    #: the CompVis zoo's encoders (models/compvis/): text2img's x-transformers BERTEmbedder, the
    #: SpatialRescaler of the semantic-map models, and layout2img's box tokens (kind box_tokens: `bert` is the
    #: encoder that reads them, `boxes` the token builder)
    bert: BERTEmbedderConfig = field(default_factory=BERTEmbedderConfig)
    rescaler: SpatialRescalerConfig = field(default_factory=SpatialRescalerConfig)
    boxes: BoxTokensConfig = field(default_factory=BoxTokensConfig)
    #: class: whether the embedding has a null class after the classes (row n_classes) for classifier-free
    #: guidance; the zoo's cin256 (1000 rows, every one a class) has none and is sampled unguided
    class_null: bool = True
    #: SDXL's two text encoders (or the refiner's one) and its added vector (models/text/sdxl.py)
    sdxl: SDXLTextConfig = field(default_factory=SDXLTextConfig)

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
            "bert": self.bert.width,
            "rescaler": None,
            "box_tokens": self.bert.width,
            "sdxl": self.sdxl.context_dim,
        }[self.kind]

    @property
    def max_boxes(self) -> int | None:
        """How many boxes a layout may hold (layout and box_tokens), None for the other kinds."""
        return {"layout": self.layout.max_boxes, "box_tokens": self.boxes.max_objects}.get(self.kind)


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
    if config.kind == "sdxl":  # the second tokenizer: `SDXLTextConditioner.set_tokenizers`
        return SDXLTextConditioner(config.sdxl, [tokenizer_dir] if tokenizer_dir is not None else [])
    if config.kind == "bert":
        return BERTConditioner(config.bert, tokenizer_dir)
    if tokenizer_dir is not None:
        raise ValueError(f"a {config.kind!r} conditioner takes no tokenizer folder (got {tokenizer_dir})")
    return _untokenized(config)


def _untokenized(config: ConditionerConfig) -> AnyConditioner:
    """The conditioners built without a tokenizer folder (MiniLM brings its own; the rest read ids, boxes or maps)."""
    if config.kind == "minilm":
        return MiniLMConditioner(config.max_length)
    if config.kind == "layout":
        return LayoutEncoder(config.n_classes, config.layout, config.class_names)
    if config.kind == "semantic":
        return SemanticEncoder(config.n_classes, config.semantic, config.class_names)
    if config.kind == "rescaler":
        return SpatialRescaler(config.rescaler)
    if config.kind == "box_tokens":
        return BoxTokenConditioner(config.bert, config.boxes)
    return ClassConditioner(config.n_classes, config.class_dim, config.class_names, null=config.class_null)
