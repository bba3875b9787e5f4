"""The alpha schedule of L_flow."""

import pytest

from gridgen.training.callbacks import AlphaSchedule, alpha_at


def test_alpha_schedule_shapes():
    assert [alpha_at(s, 0.5, delay_steps=2, ramp_steps=4) for s in range(8)] == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert alpha_at(3, 0.5, 0, 10, "constant") == 0.5
    cos = [alpha_at(s, 1.0, 0, 4, "cosine") for s in range(5)]
    assert cos[0] == 0 and cos[2] == pytest.approx(0.5) and cos[4] == pytest.approx(1.0) and cos[1] < 0.25
    with pytest.raises(ValueError, match="alpha.shape must be one of"):
        AlphaSchedule(shape="step")
