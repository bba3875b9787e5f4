"""Losses against plain per-cell references written here (eqs. 1-7)."""

import pytest
import torch

from gridgen.layout import GridLayout
from gridgen.losses import add_noise, base_loss, sample_timesteps, temporal_flow_loss

LAYOUTS = [
    GridLayout(4, 4, 32, 32),
    GridLayout(8, 8, 16, 16),
    GridLayout(4, 6, 32, 32),
    GridLayout(3, 5, 48, 32),  # non-square cell, odd grid
    GridLayout(2, 3, 16, 64),
]


def cell_tokens_loop(tokens: torch.Tensor, layout: GridLayout, i: int, j: int) -> torch.Tensor:
    """Tokens of cell (i, j), read straight off the packed token grid: (B, cell_tokens, C)."""
    grid = tokens.reshape(tokens.shape[0], layout.token_rows, layout.token_cols, tokens.shape[-1])
    ch, cw = layout.cell_token_rows, layout.cell_token_cols
    return grid[:, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw].reshape(tokens.shape[0], ch * cw, -1)


def flow_loss_reference(pred: torch.Tensor, target: torch.Tensor, layout: GridLayout,
                        across_rows: bool = True) -> torch.Tensor:
    """Eqs. (5)-(7) written as the paper reads: a loop over cells, within-row and across-row cases (the latter
    left out with ``across_rows=False``, the official code's variant)."""
    terms = []
    for i in range(layout.rows):
        for j in range(layout.cols):
            if j > 0:  # within row: cell(i, j) - cell(i, j-1)
                prev = (i, j - 1)
            elif i > 0 and across_rows:  # across rows: cell(i, 0) - cell(i-1, n)
                prev = (i - 1, layout.cols - 1)
            else:
                continue
            d_target = cell_tokens_loop(target, layout, i, j) - cell_tokens_loop(target, layout, *prev)
            d_pred = cell_tokens_loop(pred, layout, i, j) - cell_tokens_loop(pred, layout, *prev)
            terms.append((d_target.double() - d_pred.double()) ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.name}@{lay.cell_height}x{lay.cell_width}")
def test_temporal_flow_loss_matches_per_cell_loop(layout):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, layout.num_tokens, 8, generator=gen)
    target = torch.randn(2, layout.num_tokens, 8, generator=gen)
    got = temporal_flow_loss(pred, target, layout)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), flow_loss_reference(pred, target, layout), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay.cols > 1], ids=lambda lay: lay.name)
def test_within_row_flow_loss_matches_the_loop_without_row_breaks(layout):
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 2, layout.num_tokens, 8, generator=gen)
    got = temporal_flow_loss(pred, target, layout, pairs="within_row")
    torch.testing.assert_close(got.double(), flow_loss_reference(pred, target, layout, across_rows=False),
                               rtol=1e-5, atol=1e-7)
    if layout.rows > 1:  # the two variants differ exactly by the row-break pairs
        assert not torch.isclose(got, temporal_flow_loss(pred, target, layout))
    with pytest.raises(ValueError, match="flow_pairs must be one of"):
        temporal_flow_loss(pred, target, layout, pairs="rows")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_flow_loss_zero_when_pred_equals_target(layout):
    x = torch.randn(3, layout.num_tokens, 4)
    assert temporal_flow_loss(x, x.clone(), layout).item() == 0.0
    # a constant offset over the whole grid has no temporal change either
    assert temporal_flow_loss(x + 1.5, x, layout).item() == pytest.approx(0.0, abs=1e-10)


def test_across_row_term_is_present():
    """A change confined to the row-break pair (last cell of row 0, first cell of row 1) moves the loss."""
    layout = GridLayout(2, 3, 32, 32)
    target = torch.zeros(1, layout.num_tokens, 4)
    pred = torch.zeros_like(target)
    cells = layout.tokens_to_cells(pred)  # (1, 6, 4, 4)
    cells[:, 3] += 1.0  # cell (1, 0): its only "previous" cell is (0, 2), across the row break
    cells[:, 4] += 1.0  # keep (1,0)->(1,1) within-row difference at zero
    cells[:, 5] += 1.0
    pred = layout.cells_to_tokens(cells)
    loss = temporal_flow_loss(pred, target, layout)
    # only the across-row delta is non-zero: 1 of 5 deltas, each of 4 tokens x 4 channels of value 1
    assert loss.item() == pytest.approx(1 / 5)
    assert flow_loss_reference(pred, target, layout).item() == pytest.approx(1 / 5)
    assert temporal_flow_loss(pred, target, layout, pairs="within_row").item() == 0.0  # the official code's misses it


def test_fp32_accumulation_under_bf16():
    layout = GridLayout(4, 4, 32, 32)
    pred = torch.randn(2, layout.num_tokens, 64).bfloat16()
    target = torch.randn(2, layout.num_tokens, 64).bfloat16()
    got = temporal_flow_loss(pred, target, layout)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), flow_loss_reference(pred.float(), target.float(), layout), rtol=1e-5,
                               atol=0)
    assert base_loss(pred, target).dtype == torch.float32


def test_flow_matching_pieces():
    x0, noise = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, target = add_noise(x0, noise, t)
    for b in range(3):  # eq. (1)
        torch.testing.assert_close(x_t[b], (1 - t[b]) * x0[b] + t[b] * noise[b])
    torch.testing.assert_close(target, noise - x0)  # eq. (2)
    torch.testing.assert_close(base_loss(target, noise - x0), torch.tensor(0.0))  # eq. (4)
    pred = torch.randn_like(target)
    torch.testing.assert_close(base_loss(pred, target), ((pred - target) ** 2).mean())


def test_timestep_sampling_modes():
    gen = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal", "shifted"):
        t = sample_timesteps(4096, mode, generator=gen)
        assert t.shape == (4096,) and bool(((t > 0) & (t < 1)).all())
    shifted = sample_timesteps(4096, "shifted", shift=3.0, generator=torch.Generator().manual_seed(1))
    uniform = sample_timesteps(4096, "uniform", generator=torch.Generator().manual_seed(1))
    # FLUX's shift maps u to 3u / (1 + 2u): same draws, pushed towards high noise
    torch.testing.assert_close(shifted, 3 * uniform / (1 + 2 * uniform))
    with pytest.raises(ValueError, match="timestep_sampling must be one of"):
        sample_timesteps(2, "beta")
