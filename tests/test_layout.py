import pytest
import torch
from diffusers import FluxPipeline

from gridgen.layout import GridLayout


def test_geometry_4x6():
    layout = GridLayout.parse("4x6", 256)
    assert (layout.height, layout.width) == (1024, 1536)
    assert (layout.latent_height, layout.latent_width) == (128, 192)
    assert (layout.token_rows, layout.token_cols, layout.num_tokens) == (64, 96, 6144)
    assert (layout.cell_token_rows, layout.cell_token_cols, layout.cell_tokens) == (16, 16, 256)
    assert layout.caption_prefix() == "A 24-frame sequence arranged in a 4x6 grid."
    assert layout.caption("a cat runs. ").startswith("A 24-frame sequence arranged in a 4x6 grid. a cat runs.")
    assert layout.cell_of_frame(7) == (1, 1)


def test_image_ids_match_diffusers():
    layout = GridLayout(2, 3, 32, 48)
    ref = FluxPipeline._prepare_latent_image_ids(1, layout.latent_height // 2, layout.latent_width // 2, "cpu",
                                                 torch.float32)
    torch.testing.assert_close(layout.image_ids(), ref)


def test_tile_untile_film_strip_order():
    layout = GridLayout(3, 4, 16, 32)
    frames = torch.arange(12.0)[:, None, None, None].expand(12, 3, 16, 32)  # frame k is filled with k
    grid = layout.tile(frames)
    assert grid.shape == (3, 48, 128)
    for k in range(12):
        i, j = divmod(k, 4)  # row-major
        assert bool((grid[:, i * 16:(i + 1) * 16, j * 32:(j + 1) * 32] == k).all())
    torch.testing.assert_close(layout.untile(grid), frames)


def test_tokens_to_cells_matches_packing():
    """A grid image whose cell k holds value k keeps that value in cell k's packed tokens."""
    layout = GridLayout(2, 3, 32, 16)
    frames = torch.arange(6.0)[:, None, None, None].expand(6, 16, 4, 2)  # latent-resolution cells
    latents = layout.tile(frames)[None]  # (1, 16, 8, 6)
    tokens = FluxPipeline._pack_latents(latents, 1, 16, latents.shape[2], latents.shape[3])
    cells = layout.tokens_to_cells(tokens)
    for k in range(6):
        assert bool((cells[0, k] == k).all())
    torch.testing.assert_close(layout.cells_to_tokens(cells), tokens)


@pytest.mark.parametrize("bad, match", [
    (dict(rows=4, cols=6, cell_height=20, cell_width=32), "cell_height must be a positive multiple of 16"),
    (dict(rows=0, cols=6, cell_height=32, cell_width=32), "rows must be a positive integer"),
])
def test_rejects_misaligned(bad, match):
    with pytest.raises(ValueError, match=match):
        GridLayout(**bad)


def test_rejects_layout_not_dividing_resolution():
    with pytest.raises(ValueError, match="layout 4x6 needs a grid height divisible by 4 and width divisible by 6"):
        GridLayout.from_image_size(4, 6, 1024, 1000)
    with pytest.raises(ValueError, match="must look like"):
        GridLayout.parse("4by6", 32)
