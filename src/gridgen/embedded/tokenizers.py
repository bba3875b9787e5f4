"""The tiny pipeline's tokenizers, learned in code on a built-in caption corpus: CLIP's byte-level BPE and T5's Unigram.

Both are written in the file formats ``FluxPipeline.from_pretrained`` reads (``tokenizer.json`` plus, for CLIP, the
``vocab.json``/``merges.txt`` of transformers 4) and are deterministic: the same corpus gives the same bytes.
"""

from __future__ import annotations

import json
from math import log
from pathlib import Path
from typing import Any

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


def write_clip_tokenizer_files(folder: Path, corpus: list[str], num_merges: int = 600) -> None:
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


def finalise_tokenizer_folders(pipeline_dir: Path) -> None:
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


def build_tiny_tokenizers(staging_dir: str | Path, corpus: list[str] | None = None) -> tuple[Any, Any]:
    """Train the tiny CLIP (BPE) and T5 (Unigram) tokenizers on ``corpus`` (default :func:`caption_corpus`) and
    load them with the classes FluxPipeline uses.

    They are loaded back through ``from_pretrained`` (not constructed directly) so the objects handed to the
    pipeline are exactly what a later ``FluxPipeline.from_pretrained`` reconstructs.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    staging = Path(staging_dir)
    corpus = caption_corpus() if corpus is None else corpus
    clip_dir, t5_dir = staging / "clip", staging / "t5"
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(clip_dir, corpus)
    _write_t5_tokenizer_files(t5_dir, corpus)
    clip_tok = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=CLIP_MAX_LENGTH)
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_dir), model_max_length=T5_MAX_LENGTH, extra_ids=0)
    return clip_tok, t5_tok
