"""Per-task initialisation (eq. 8 interpolation, expansion, sequences), prompts files, references cropped to the
cell."""

import numpy as np
import pytest
import torch
from PIL import Image

from gridgen.generate import generate
from gridgen.inference import TaskSpec, initial_frames, keep_tokens, read_requests, reference_frames
from gridgen.layout import GridLayout
from tests.helpers.generate import gen_cfg, save_images


def test_interpolation_init_is_eq8_and_keyframes_are_kept(tmp_path):
    layout = GridLayout(3, 4, 16, 16)
    for count in (3, 4):  # one keyframe per row, or with the end keyframe
        keys = torch.rand(count, 3, 16, 16) * 2 - 1
        spec = TaskSpec("interpolate", init="interpolate", reference="keyframes", keep="reference")
        frames, keep = initial_frames(spec, layout, keys)
        n = layout.cols
        for i in range(layout.rows):  # eq. (8) written plainly: I_ij = (1 - j/n) I_i0 + (j/n) I_(i+1)0
            nxt = keys[i + 1] if i + 1 < count else keys[i]
            for j in range(n):
                expected = (1 - j / n) * keys[i] + (j / n) * nxt
                torch.testing.assert_close(frames[i * n + j], expected, rtol=0, atol=1e-6)
                assert keep[i * n + j].item() == (j == 0)
    # keyframes from a folder come in natural name order (key_10 after key_2), resized to the cell
    folder = tmp_path / "keys"
    save_images(folder, 11, (32, 32))
    frames = reference_frames(TaskSpec("interpolate", init="interpolate", reference="keyframes", keep="reference"),
                              GridLayout(10, 2, 16, 16), folder)
    key_10 = np.asarray(Image.open(folder / "key_10.png").resize((16, 16), Image.Resampling.BICUBIC), np.float32)
    torch.testing.assert_close(frames[10], torch.from_numpy(key_10).permute(2, 0, 1) / 127.5 - 1)


def test_expansion_sequence_and_keep_tokens():
    layout = GridLayout(2, 3, 32, 16)
    ref = torch.rand(1, 3, 32, 16)
    frames, keep = initial_frames(TaskSpec("i2v", init="expand", reference="image", keep="reference"), layout, ref)
    assert all(torch.equal(f, ref[0]) for f in frames) and keep.tolist() == [True] + [False] * 5
    seq = torch.rand(6, 3, 32, 16)
    frames, keep = initial_frames(TaskSpec("edit", init="sequence", reference="sequence"), layout, seq)
    assert torch.equal(frames, seq) and not keep.any()
    cells = torch.tensor([True, False, False, True, False, True])
    tokens = keep_tokens(layout, cells)  # (1, N, 1)
    per_cell = layout.tokens_to_cells(tokens.float())  # (1, F, cell_tokens, 1)
    assert per_cell.shape[2] == layout.cell_tokens
    assert torch.equal(per_cell.amin(dim=(2, 3))[0].bool(), cells) and torch.equal(per_cell.amax(dim=(2, 3))[0].bool(), cells)


def test_prompts_file_lines_json_lines_and_seeds(tmp_path):
    path = tmp_path / "p.txt"
    (tmp_path / "dog.png").touch()  # found next to the prompts file; default.png is read from the working directory
    path.write_text('# header\n\na cat walks\n{"prompt": "a dog runs", "ref": "dog.png", "seed": 42}\na bird, flying\n')
    requests = read_requests(None, str(path), "default.png", seed=10)
    assert [(r.prompt, r.seed, r.ref) for r in requests] == [
        ("a cat walks", 10, "default.png"), ("a dog runs", 42, str(tmp_path / "dog.png")), ("a bird, flying", 12, "default.png")]
    with pytest.raises(ValueError, match="no prompt"):
        read_requests(None, None, None, 0)
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.txt:1: a JSON line needs a \"prompt\" string"):
        read_requests(None, str(path), None, 0)


def test_wrong_aspect_reference_is_cropped_with_a_warning(tmp_path, refs, caplog):
    Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / "wide.png")
    manifest = generate(gen_cfg(tmp_path, "task=i2v", f"ref={tmp_path / 'wide.png'}", "prompt=x", "generate.steps=1",
                                "export.mp4=false", "export.gif=false", "export.frames=false"))
    assert "center-cropped to 67% of it" in caplog.text and len(manifest["samples"]) == 1
