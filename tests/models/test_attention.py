"""The attention backend: never cuDNN by default on CUDA, diffusers' backends set on the transformer and reset
by SDPA."""

import pytest

from gridgen.models.attention import (
    apply_attention_backend,
    resolve_attention_backend,
    sdpa_kernels,
    set_sdpa_kernels,
)
from gridgen.train import train
from tests.helpers.train import make_cfg_no_val


@pytest.fixture
def sdpa_flags():
    """The process-global SDPA kernel flags, restored after the test."""
    saved = sdpa_kernels()
    yield
    set_sdpa_kernels(*saved)


def test_attention_backend_never_cudnn_by_default_on_cuda(sdpa_flags):
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert apply_attention_backend("auto", "cuda") == "sdpa_no_cudnn"
    assert sdpa_kernels() == (True, True, True, False)
    apply_attention_backend("sdpa_math", "cuda")
    assert sdpa_kernels() == (False, False, True, False)
    with pytest.raises(ValueError, match="model.attention_backend='nope' is unknown"):
        resolve_attention_backend("nope", "cuda")


def test_diffusers_attention_backend_is_set_on_the_transformer(tmp_path):
    cfg = make_cfg_no_val(tmp_path, "trainer.max_steps=1", "model.attention_backend=_native_math")
    train(cfg)
    assert "attention_backend: _native_math" in (tmp_path / "run" / "config.yaml").read_text()


def test_sdpa_backend_resets_a_diffusers_backend(sdpa_flags):
    from diffusers import FluxTransformer2DModel

    from gridgen.embedded import TINY_FLUX_CONFIG

    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    apply_attention_backend("_native_math", "cpu", transformer)
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {"_native_math"}
    apply_attention_backend("sdpa_math", "cpu", transformer)
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {None} and sdpa_kernels() == (False, False, True, False)
