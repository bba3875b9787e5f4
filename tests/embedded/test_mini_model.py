"""The miniature's pipeline folder (gridgen.embedded.mini_model)."""








def test_mini_pipeline_is_a_flux_pipeline_whose_tokenizers_know_the_world(tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from gridgen.embedded.mini_model import MINI_TRANSFORMER_CONFIG, build_mini_pipeline
    from gridgen.embedded.mini_vae import MINI_VAE_CONFIG

    folder = build_mini_pipeline(AutoencoderKL(**MINI_VAE_CONFIG), tmp_path / "init")
    assert not list(tmp_path.glob(".init.tmp-*"))
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_single_layers == MINI_TRANSFORMER_CONFIG["num_single_layers"]
    tokens = pipe.tokenizer_2.tokenize("A 16-frame sequence arranged in a 4x4 grid. a purple triangle moves quickly "
                                       "to the upper left")
    assert "▁triangle" in tokens and "▁upper" in tokens and len(tokens) + 1 <= 20  # + </s>: model.max_sequence_length=20
    clip_tokens = pipe.tokenizer.tokenize("a cyan square moves in a counterclockwise circle")
    assert len(clip_tokens) < 12
