"""models/layers.py: an item's linear output is bit-identical alone or inside any batch, on the CPU paths
it takes in fp32 (oneDNN folded with >= 2 rows per item, per-item products otherwise)."""

import pytest
import torch
import torch.nn.functional as F

from models.layers import batch_invariant_linear

# (rows per item, in, out): SD-1.5's token linears at 256 px (1024 / 256 / 64 tokens, 77-token context), the
# small test models' widths, odd latents' token counts (9x9 -> 81, 3x3 -> 9), a LoRA rank-4 product, 2 rows
SHAPES = [(1024, 320, 320), (256, 640, 5120), (64, 1280, 1280), (64, 5120, 1280), (77, 768, 1280),
          (81, 32, 256), (9, 128, 32), (16, 64, 4), (16, 4, 64), (2, 320, 1280), (1, 320, 1280)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_items_round_the_same_in_any_batch(threads: int) -> None:
    """fp32 only: in bf16 neither oneDNN's folded product nor `bmm` rounds an item the same in every batch."""
    dtype = torch.float32
    with torch.inference_mode():
        for rows, k, n in SHAPES:
            g = torch.Generator().manual_seed(rows + k + n)
            w, b = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype), torch.randn(n, generator=g).to(dtype)
            xs = torch.randn(8, rows, k, generator=g).to(dtype)
            alone = [batch_invariant_linear(xs[i : i + 1], w, b) for i in range(8)]
            for batch in (2, 3, 5, 8):
                out = batch_invariant_linear(xs[:batch], w, b)
                for i in range(batch):
                    assert torch.equal(out[i], alone[i][0]), (rows, k, n, batch, i)
            ref = F.linear(xs, w, b)
            assert (torch.cat(alone) - ref).abs().max() <= 1e-5 * ref.abs().max(), (rows, k, n)


def test_no_bias_and_leading_dims() -> None:
    """[N, H, W, C] inputs (a LoRA conv adapter's up product) and no bias: the same as F.linear."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 16, generator=g).permute(0, 2, 1, 3)  # not contiguous
    w = torch.randn(5, 16, generator=g)
    with torch.inference_mode():
        out = batch_invariant_linear(x, w)
        assert out.shape == (3, 4, 8, 5)
        assert torch.allclose(out, F.linear(x, w), atol=1e-6)
        assert torch.equal(out[1], batch_invariant_linear(x[1:2], w)[0])
