"""A tiny but complete FLUX.1-dev-shaped diffusers pipeline, built in code.

Tests, smoke runs and CI need a FLUX pipeline without downloading 30 GB of gated weights. This module builds
one from scratch: every component has FLUX.1-dev's architecture and config keys (a guidance-distilled
``FluxTransformer2DModel``, a 16-channel VAE with spatial factor 8 and FLUX's shift/scaling factors, CLIP and T5
text encoders, FLUX.1-dev's scheduler config) but only a few thousand parameters each, and the tokenizers are
trained in code on a built-in caption corpus. The result is saved with ``save_pretrained`` so that it goes
through exactly the same ``FluxPipeline.from_pretrained`` path as the real model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from math import log
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Bump whenever anything below changes what gets built, so that stale caches are not reused.
TINY_FLUX_FORMAT_VERSION = 1
TINY_FLUX_NAME = "flux_tiny"
# Written last into a built folder; its presence (with the right version) marks the build as ours and complete.
MARKER_FILE = "gridgen_tiny.json"

# Transformer sizes. FLUX.1-dev: 19 double / 38 single blocks, 24 heads x 128, T5 4096, CLIP 768, rope (16, 56, 56).
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 packing
    "out_channels": None,  # = in_channels
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,  # = T5 d_model
    "pooled_projection_dim": 32,  # = CLIP hidden_size
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled
    "axes_dims_rope": (4, 6, 6),  # must sum to attention_head_dim
}

# FLUX's VAE: 16 latent channels, 4 blocks (spatial factor 2**3 = 8), no quant convs, shift + scaling factor.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# openai/clip-vit-large-patch14 text tower, shrunk; hidden_size must equal pooled_projection_dim.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

# google/t5-v1_1-xxl encoder, shrunk; d_model must equal joint_attention_dim.
TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

# ----------------------------------------------------------------------------------------------- corpus

_COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
    "black", "white", "gray", "grey", "cyan", "magenta", "gold", "silver",
)  # fmt: skip
_SHAPES = (
    "circle", "square", "triangle", "star", "ball", "cube", "box", "disk", "ring", "line",
    "dot", "heart", "rectangle", "sphere", "cone", "cylinder", "hexagon", "diamond",
)  # fmt: skip
_MOTIONS = (
    "moves right", "moves left", "moves up", "moves down", "rotates clockwise",
    "rotates counterclockwise", "spins", "grows", "shrinks", "bounces", "falls", "rises",
    "fades in", "fades out", "zooms in", "zooms out", "slides across the frame", "turns around",
)  # fmt: skip
_LAYOUTS = ((1, 2), (2, 1), (1, 4), (2, 2), (2, 3), (3, 2), (2, 4), (3, 3), (3, 4), (4, 3), (4, 4),
            (4, 6), (6, 4), (4, 8), (5, 5), (6, 6), (8, 8))  # fmt: skip
_COMMON_TEXT = """
the a an of and or to in on at with from by for into onto over under above below behind between
is are was were be been being has have had do does did not no yes this that these those it its
they them their there here where when while then than as so very more most less few many some all
each every one two three four five six seven eight nine ten eleven twelve sixteen twenty
first second third last next previous frame frames view views camera shot scene object objects
background foreground sequence grid image images video videos photo picture cell cells row rows
column columns left right up down top bottom middle center centre corner edge side front back
small large big tiny huge little bright dark light shiny matte smooth rough soft hard round flat
slowly quickly fast slow smoothly steadily gradually suddenly again around across along through
move moves moving moved rotate rotates rotating turn turns turning orbit orbits orbiting walk
walks walking run runs running jump jumps jumping fly flies flying swim swims swimming person
man woman child dog cat bird car tree house street city sky sun moon cloud water sea river road
table chair cup bottle book flower grass snow rain night day morning evening room wall floor
360 degree degrees turntable orbit elevation azimuth angle angles rendered render 3d model
multiview consistent identical same different each other following shows showing depicts
"""
_DIGITS = [str(i) for i in range(0, 65)]


def caption_corpus() -> list[str]:
    """The built-in, deterministic training corpus for the tiny tokenizers (GRID-style captions + words)."""
    lines: list[str] = []
    for rows, cols in _LAYOUTS:
        n = rows * cols
        lines.append(f"A {n}-frame sequence arranged in a {rows}x{cols} grid.")
        lines.append(f"A {n}-view sequence arranged in a {rows}x{cols} grid.")
    # A strided walk over colours x shapes x motions x backgrounds instead of the full product: it covers every
    # value many times in a few hundred sentences, and is deterministic.
    for i in range(240):
        colour = _COLOURS[i % len(_COLOURS)]
        shape = _SHAPES[(3 * i) % len(_SHAPES)]
        motion = _MOTIONS[(5 * i) % len(_MOTIONS)]
        background = _COLOURS[(7 * i + 3) % len(_COLOURS)]
        if colour == background:
            background = "white" if colour != "white" else "black"
        lines.append(f"A {colour} {shape} {motion} on a {background} background.")
        lines.append(f"The {colour} {shape} {motion}; the camera is still.")
    lines.append(" ".join(_COMMON_TEXT.split()))
    capitalised = " ".join(w.capitalize() for w in _COMMON_TEXT.split())
    lines.append(capitalised + ".")
    lines.append(" ".join(_DIGITS) + " , . ; : ! ? - ( ) ' \" / x")
    return lines


# ----------------------------------------------------------------------------------------------- tokenizers


def _clip_backend_tokenizer() -> Any:
    """An untrained ``tokenizers`` pipeline identical to transformers' CLIP one (so training matches loading).

    In transformers 5 ``CLIPTokenizer.from_pretrained`` only keeps vocab/merges from tokenizer.json and rebuilds
    normalizer and pre-tokenizer itself, so the BPE must be learned with exactly this pipeline.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _learn_bpe(corpus: list[str], num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (words end in ``</w>``) on ``corpus`` through the CLIP pre-tokenizer.

    A plain greedy BPE with ties broken by the pair itself. (``tokenizers.trainers.BpeTrainer`` breaks ties
    between equally frequent pairs in hash order, so it learns different merges from run to run.)
    """
    tok = _clip_backend_tokenizer()
    words: dict[tuple[str, ...], int] = {}
    for line in corpus:
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line)):
            symbols = (*piece[:-1], piece[-1] + "</w>")
            words[symbols] = words.get(symbols, 0) + 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then lexicographic: deterministic
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def _write_clip_tokenizer_files(folder: Path, corpus: list[str], num_merges: int = 600) -> None:
    """Learn a byte-level BPE in CLIP's format and write tokenizer.json/vocab.json/merges.txt/tokenizer_config.json."""
    from tokenizers import AddedToken, processors
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import ByteLevel

    merges = _learn_bpe(corpus, num_merges)
    # CLIP's vocab layout: every byte symbol, every byte symbol at a word end ("x</w>", so no input ever maps
    # to unk), the merged symbols in merge order, then <|startoftext|> and <|endoftext|> last. (The eos id
    # must not be 2: CLIPTextModel then falls back to legacy argmax pooling.)
    alphabet = sorted(ByteLevel.alphabet())
    symbols = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), CLIP_BOS, CLIP_EOS]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}

    tok = _clip_backend_tokenizer()
    tok.model = BPE(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
    )
    tok.add_special_tokens([AddedToken(CLIP_BOS, normalized=False), AddedToken(CLIP_EOS, normalized=False)])
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False
    )
    tok.save(str(folder / "tokenizer.json"))
    _write_bpe_vocab_merges(folder)
    config = {
        "bos_token": CLIP_BOS,
        "eos_token": CLIP_EOS,
        "unk_token": CLIP_EOS,
        "pad_token": CLIP_EOS,
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_bpe_vocab_merges(folder: Path) -> None:
    """Write vocab.json + merges.txt from ``folder/tokenizer.json``: the files transformers 4's slow CLIPTokenizer reads.

    (transformers 5 only saves tokenizer.json; keeping both makes the folder loadable by either major version.)
    """
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")


# Loading kwargs that transformers 5 records in init_kwargs and then saves; they describe how the staging copy
# was loaded, not the tokenizer, so they are dropped from the saved configs.
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


def _finalise_tokenizer_folders(pipeline_dir: Path) -> None:
    """Make the saved tokenizer folders clean and loadable by transformers 4 and 5."""
    for sub in ("tokenizer", "tokenizer_2"):
        config_path = pipeline_dir / sub / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if any(k in config for k in _LOAD_TIME_KEYS):
            config = {k: v for k, v in config.items() if k not in _LOAD_TIME_KEYS}
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not (pipeline_dir / "tokenizer" / "vocab.json").exists():
        _write_bpe_vocab_merges(pipeline_dir / "tokenizer")


def _unigram_vocab(corpus: list[str]) -> list[tuple[str, float]]:
    """A deterministic SentencePiece-style Unigram vocab: whole words plus a character fallback.

    Scores are log-frequencies. Words score far above any character spelling, and every printable ASCII
    character exists both word-initially ("▁x") and inside a word ("x"), so unseen words never become unk.
    (We build the vocab ourselves instead of running ``UnigramTrainer``, whose parallel EM gives no
    bit-for-bit reproducibility guarantee.)
    """
    counts: dict[str, int] = {}
    for line in corpus:
        for word in line.split():
            # split trailing/leading punctuation off, as SentencePiece pieces usually are
            core = word.strip(".,;:!?\"'()")
            for piece in ("▁" + core if core else None, *[c for c in word if not c.isalnum()]):
                if piece:
                    counts[piece] = counts.get(piece, 0) + 1
    total = sum(counts.values())
    vocab: dict[str, float] = {piece: log(n / total) for piece, n in counts.items()}
    char_score = min(vocab.values()) - 10.0
    for code in range(32, 127):
        for piece in (chr(code), "▁" + chr(code)):
            vocab.setdefault(piece, char_score)
    vocab.setdefault("▁", char_score)
    pieces = sorted(vocab.items(), key=lambda kv: (-kv[1], kv[0]))
    # T5 layout: <pad>=0, </s>=1, <unk>=2 (transformers' T5Tokenizer hard-codes unk_id=2)
    return [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), *pieces]


def _write_t5_tokenizer_files(folder: Path, corpus: list[str]) -> None:
    """Write a T5-style Unigram tokenizer (tokenizer.json + tokenizer_config.json) to ``folder``."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = _unigram_vocab(corpus)
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # Same pipeline as transformers 5's T5Tokenizer, which rebuilds it on load and keeps only the vocab.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in (T5_PAD, T5_EOS, T5_UNK)])
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "pad_token": T5_PAD,
        "eos_token": T5_EOS,
        "unk_token": T5_UNK,
        "extra_ids": 0,  # no sentinel tokens: they only matter for span-corruption pre-training
        "additional_special_tokens": [],
        "model_max_length": T5_MAX_LENGTH,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_tokenizers(staging_dir: str | Path) -> tuple[Any, Any]:
    """Train the tiny CLIP (BPE) and T5 (Unigram) tokenizers and load them with the classes FluxPipeline uses.

    They are loaded back through ``from_pretrained`` (not constructed directly) so the objects handed to the
    pipeline are exactly what a later ``FluxPipeline.from_pretrained`` reconstructs.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    staging = Path(staging_dir)
    corpus = caption_corpus()
    clip_dir, t5_dir = staging / "clip", staging / "t5"
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)
    _write_clip_tokenizer_files(clip_dir, corpus)
    _write_t5_tokenizer_files(t5_dir, corpus)
    clip_tok = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=CLIP_MAX_LENGTH)
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_dir), model_max_length=T5_MAX_LENGTH, extra_ids=0)
    return clip_tok, t5_tok


# ----------------------------------------------------------------------------------------------- models


def build_tiny_flux_pipeline(seed: int = 0, staging_dir: str | Path | None = None) -> Any:
    """Build the tiny ``FluxPipeline`` in memory (float32, CPU). Same seed -> bitwise-identical weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(TINY_FLUX_CONFIG["axes_dims_rope"]) != TINY_FLUX_CONFIG["attention_head_dim"]:
        raise ValueError("axes_dims_rope must sum to attention_head_dim")

    with tempfile.TemporaryDirectory(dir=staging_dir) as tmp:
        clip_tok, t5_tok = build_tiny_tokenizers(tmp)

    # Reseed before every component: each one's weights then depend only on (seed, its own config), not on
    # how many random numbers the others drew.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok),
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,  # pooled output = hidden state at the first eos
        pad_token_id=clip_tok.pad_token_id,
        **TINY_CLIP_CONFIG,
    )
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 3)
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        num_decoder_layers=TINY_T5_CONFIG["num_layers"],
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
        **TINY_T5_CONFIG,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)

    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# ----------------------------------------------------------------------------------------------- on disk


def tiny_flux_dirname(seed: int = 0) -> str:
    """Cache folder name of the tiny pipeline for ``seed``, e.g. ``flux_tiny-v1-seed0``."""
    return f"{TINY_FLUX_NAME}-v{TINY_FLUX_FORMAT_VERSION}-seed{seed}"


def is_tiny_flux_folder(folder: str | Path, seed: int | None = None) -> bool:
    """True if ``folder`` holds a complete tiny pipeline of the current format version (and ``seed``, if given)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        (folder / "model_index.json").is_file()
        and marker.get("format_version") == TINY_FLUX_FORMAT_VERSION
        and (seed is None or marker.get("seed") == seed)
    )


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename the finished build ``src`` to ``dst``, replacing an older tiny build there."""
    try:
        os.replace(src, dst)  # atomic; fails if dst is a non-empty folder
        return
    except OSError:
        if not dst.exists():
            raise
    # dst exists: swap it out (two renames, each atomic) and delete the old copy afterwards.
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny FLUX pipeline for ``seed`` and save it in diffusers format to ``out_dir``; returns it.

    The pipeline is written into a temporary sibling folder and renamed into place at the end, so an
    interrupted build never leaves a complete-looking half-written ``out_dir``. An existing tiny build at
    ``out_dir`` is replaced; any other non-empty folder there is refused.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not is_tiny_flux_folder(out_dir):
        raise FileExistsError(f"refusing to overwrite '{out_dir}': it is not empty and not a tiny FLUX build")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe = build_tiny_flux_pipeline(seed, staging_dir=tmp)
        from gridgen._quiet import library_progress_bars_off

        with library_progress_bars_off():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        _finalise_tokenizer_folders(tmp)
        marker = {"format_version": TINY_FLUX_FORMAT_VERSION, "seed": seed, "transformer": TINY_FLUX_CONFIG}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared GRIDGEN_CACHE should stay readable
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built tiny FLUX pipeline (seed %d) in %s", seed, out_dir)
    return out_dir


def default_cache_dir() -> Path:
    """``$GRIDGEN_CACHE`` if set, else ``~/.cache/gridgen``."""
    return Path(os.environ.get("GRIDGEN_CACHE") or "~/.cache/gridgen").expanduser()


def ensure_tiny_flux(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Return the folder of the cached tiny FLUX pipeline for ``seed``, building it on first use.

    Safe under concurrency: builders serialise on a file lock next to the folder, and the folder only appears
    (atomically) once complete, so readers that skip the lock never see a partial build.
    """
    from filelock import FileLock

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / tiny_flux_dirname(seed)
    if is_tiny_flux_folder(folder, seed):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{folder.name}.lock")):
        if not is_tiny_flux_folder(folder, seed):  # another process may have built it while we waited
            logger.info("building tiny FLUX pipeline in %s (first use)", folder)
            build_tiny_flux(folder, seed)
    return folder
