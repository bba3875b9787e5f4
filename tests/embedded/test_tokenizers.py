"""The tiny pipeline's CLIP BPE and T5 Unigram tokenizers, learned in code: captions round-trip, unseen text
never unk."""

from __future__ import annotations

from tests.helpers.flux import CAPTION


def test_tokenizers_round_trip(pipe) -> None:
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2

    ids = clip(CAPTION).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.eos_token_id != 2  # CLIPTextModel would fall back to legacy argmax pooling
    assert clip.decode(ids, skip_special_tokens=True).replace(" ", "") == CAPTION.lower().replace(" ", "")
    words = [t for t in clip.convert_ids_to_tokens(ids[1:-1]) if t.endswith("</w>")]
    assert {"grid</w>", "red</w>", "circle</w>", "background</w>"} <= set(words)  # learned whole words

    ids = t5(CAPTION).input_ids
    assert ids[-1] == t5.eos_token_id
    assert t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == CAPTION
    assert len(ids) < 30  # caption words are single pieces, not characters

    unseen = "Zebra quokka xylophone 7x9!"  # out-of-corpus text falls back to characters, never unk
    assert clip.unk_token_id not in clip(unseen).input_ids[1:-1]
    assert t5.unk_token_id not in t5(unseen).input_ids
