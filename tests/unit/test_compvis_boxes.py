"""The layout2img-openimages256 box tokens (models/compvis/boxes.py) against worked examples computed by hand
from taming-transformers' `ObjectsBoundingBoxConditionalBuilder` (objects_bbox.py, objects_center_points.py,
conditional_builder/utils.py) with the zoo model's sizes: no_tokens 8192 (BERTEmbedder vocab_size), 92 tokens
(max_seq_len) = 30 objects x 3 + the crop pair, encode_crop on. There is no oracle to run here, so each expected
number below is derived in its comment from that code's arithmetic, not from ours."""

from __future__ import annotations

import pytest

from models.compvis.boxes import BoxTokensConfig, box_tokens, cell, layout_tokens
from models.conditioning import Box, ConditionError

ZOO = BoxTokensConfig.for_sequence(92, 8192)
NONE = 8191  # `none` = no_tokens - 1


def test_the_zoo_builder_sizes() -> None:
    # no_sections = int(math.sqrt(8192)) = int(90.50966...) = 90; embedding_dim = 30 * 3 + 2 = 92
    assert (ZOO.sections, ZOO.none, ZOO.max_objects, ZOO.length) == (90, 8191, 30, 92)
    with pytest.raises(ValueError, match="3 \\* objects \\+ 2"):
        BoxTokensConfig.for_sequence(90, 8192)  # 88 is no whole number of triples


def test_coordinates_to_cells() -> None:
    # tokenize_coordinates: int(round(y * 89)) * 90 + int(round(x * 89))
    assert cell(ZOO, 0.0, 0.0) == 0  # the top-left cell
    assert cell(ZOO, 1.0, 1.0) == 89 * 90 + 89 == 8099  # the bottom-right cell
    assert cell(ZOO, 1.0, 0.0) == 89  # end of the first row
    # x = 0.25: 22.25 -> 22; y = 0.5: 44.5 -> 44, Python's round halves to even (half-up would give 45 -> 4072)
    assert cell(ZOO, 0.25, 0.5) == 44 * 90 + 22 == 3982
    # x = 0.75: 66.75 -> 67; y = 1.0: 89
    assert cell(ZOO, 0.75, 1.0) == 89 * 90 + 67 == 8077


def test_one_box_layout_worked_example() -> None:
    """A cat-like object of category 5 in the lower middle: box [x0, y0, x1, y1] = [0.25, 0.5, 0.75, 1.0].
    taming's bbox = (x0, y0, w, h) = (0.25, 0.5, 0.5, 0.5); rescale_annotations with the full crop keeps it
    (x0, y0 clamped to [0, 1]; w = min(0.5, 1 - 0.25), h = min(0.5, 1 - 0.5)); token_pair_from_bbox gives the
    cells of (0.25, 0.5) = 3982 and (0.75, 1.0) = 8077 (see above); object_representation = 5 + 340 * 0 = 5.
    Then 29 empty triples (8191, 8191, 8191), then _crop_encoder(FULL_CROP) = cells of (0, 0) and (1, 1)."""
    tokens = layout_tokens(ZOO, [Box(5, 0.25, 0.5, 0.75, 1.0)])
    assert tokens == [5, 3982, 8077] + [NONE] * 87 + [0, 8099]


def test_two_box_layout_worked_example() -> None:
    """Boxes keep their given order (the original shuffles them; the model saw every order).
    Box 2, category 339 (the last one: taming sorts OpenImages ids and moves /m/01s55n last), [0.1, 0.2, 0.7, 0.9]:
    top-left x = round(0.1 * 89 = 8.9) = 9, y = round(0.2 * 89 = 17.8) = 18 -> 18 * 90 + 9 = 1629;
    bottom-right x0 + w = 0.1 + (0.7 - 0.1) = 0.7 -> round(62.3) = 62, y0 + h = 0.9 -> round(80.1) = 80
    -> 80 * 90 + 62 = 7262."""
    tokens = layout_tokens(ZOO, [Box(5, 0.25, 0.5, 0.75, 1.0), Box(339, 0.1, 0.2, 0.7, 0.9)])
    assert tokens[:6] == [5, 3982, 8077, 339, 1629, 7262]
    assert tokens[6:90] == [NONE] * 84 and tokens[90:] == [0, 8099]
    assert box_tokens(ZOO, Box(0, 0.0, 0.0, 1.0, 1.0)) == (0, 0, 8099)  # the whole image


def test_what_the_model_cannot_take_is_refused() -> None:
    with pytest.raises(ConditionError, match="0..339"):
        layout_tokens(ZOO, [Box(340, 0.0, 0.0, 0.5, 0.5)])  # beyond the 340 OpenImages categories
    with pytest.raises(ConditionError, match="at most 30"):  # the original truncates with a warning
        layout_tokens(ZOO, [Box(1, 0.0, 0.0, 0.5, 0.5)] * 31)
    with pytest.raises(ConditionError, match="at least one box"):
        layout_tokens(ZOO, [])
