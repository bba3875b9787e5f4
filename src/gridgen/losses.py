"""GRID training objective, paper eqs. (1)-(7), on packed FLUX tokens ``(B, N, C)``.

    x_t    = (1 - t) x_0 + t eps                                   eq. (1)
    f(x_t, t, c') -> eps - x_0  (the velocity target)              eq. (2)
    L      = L_base + alpha * L_flow                               eq. (3)
    L_base = E |v - v_theta|^2                                     eq. (4)
    L_flow = E |Delta v - Delta v_theta|^2                         eq. (5)-(7)

where Delta takes the difference between each cell and its predecessor in film-strip order: within a
row ``cell(i, j) - cell(i, j-1)`` and across the row break ``cell(i, 0) - cell(i-1, last)``. Flattening
the cells row-major turns both cases into one difference along the cell axis.

``pairs="within_row"`` keeps only the within-row differences: the official GRID code's variant, which the
ablation of ``make mini`` compares with the paper's film strip (``pairs="filmstrip"``, the default).

Plain PyTorch: no Lightning import, usable from a notebook.
"""

from __future__ import annotations

import torch

from gridgen.layout import GridLayout

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "shifted")
FLOW_PAIRS = ("filmstrip", "within_row")  # which neighbour differences L_flow compares


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1)-(2): returns ``(x_t, target)`` with ``x_t = (1-t) x0 + t noise`` and ``target = noise - x0``.

    ``t`` has shape ``(B,)`` and is broadcast over the remaining dimensions.
    """
    t_b = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
    return (1.0 - t_b) * x0 + t_b * noise, noise - x0


def base_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (4): mean squared error over every token of the grid, accumulated in fp32."""
    return torch.mean((pred.float() - target.float()) ** 2)


def cell_deltas(tokens: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Eq. (5)/(6): ``(B, N, C)`` -> ``(B, rows*cols - 1, cell_tokens, C)`` film-strip differences.

    Entry ``k - 1`` is ``cell[k] - cell[k - 1]`` for cells ``k = 1 .. rows*cols - 1`` in row-major order,
    which is the within-row difference for ``k % cols != 0`` and the across-row one otherwise.
    """
    cells = layout.tokens_to_cells(tokens)  # (B, rows*cols, cell_tokens, C)
    return cells[:, 1:] - cells[:, :-1]


def temporal_flow_loss(pred: torch.Tensor, target: torch.Tensor, layout: GridLayout,
                       pairs: str = "filmstrip") -> torch.Tensor:
    """Eq. (7): MSE between predicted and target film-strip differences, fp32 accumulation.

    ``pairs``: ``filmstrip`` (the paper: every consecutive pair, across row breaks too) or ``within_row`` (only
    ``cell(i, j) - cell(i, j-1)``, as the official code). A layout without such pairs gives 0.
    """
    if pairs not in FLOW_PAIRS:
        raise ValueError(f"loss.flow_pairs must be one of {FLOW_PAIRS}, got {pairs!r}")
    if layout.num_cells < 2:
        return pred.new_zeros((), dtype=torch.float32)
    # Delta is linear, so Delta(target) - Delta(pred) = Delta(target - pred): one reshape instead of two.
    error = target.float() - pred.float()  # (B, N, C)
    deltas = cell_deltas(error, layout)  # (B, rows*cols - 1, cell_tokens, C); entry k-1 is cell k - cell k-1
    if pairs == "within_row":
        if layout.cols < 2:
            return pred.new_zeros((), dtype=torch.float32)
        within = [k - 1 for k in range(1, layout.num_cells) if k % layout.cols != 0]
        deltas = deltas[:, within]
    return torch.mean(deltas ** 2)


def sample_timesteps(
    batch_size: int,
    mode: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times ``t`` in (0, 1), shape ``(B,)``.

    - ``uniform``: ``t ~ U(0, 1)`` as in eq. (1);
    - ``logit_normal``: ``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std)`` (SD3 / Esser et al. 2024);
    - ``shifted``: uniform ``u`` mapped by FLUX's time shift ``s u / (1 + (s - 1) u)``, which spends
      more steps at high noise, as large grids need (more tokens, same signal per token).
    """
    if mode == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if mode == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(n)
    if mode == "shifted":
        if shift <= 0:
            raise ValueError(f"loss.timestep_shift must be > 0, got {shift}")
        u = torch.rand(batch_size, generator=generator, device=device)
        return shift * u / (1.0 + (shift - 1.0) * u)
    raise ValueError(f"loss.timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {mode!r}")
