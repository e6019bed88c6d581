"""SentencePiece ``tokenizer.model`` -> ``tokenizer.json`` + ``tokenizer_config.json``.

mlx-lm loads tokenizers through Hugging Face `transformers`, which mis-encodes a bare
SentencePiece model (no "▁" word-start marker, no BOS). This module writes the equivalent
`tokenizers` pipeline, mirroring SentencePiece's own steps:

    normalize (precompiled charsmap, optional whitespace cleanup) -> prepend "▁" (add_dummy_prefix)
    -> spaces to "▁" -> BPE / Unigram over the whole string (byte fallback) -> "<s>" prepended

so that ``tokenizer.encode(text)`` equals ``[bos] + sp.encode(text)``; ``split_special_tokens``
keeps a literal "<s>" in the text from being read as the control token, as SentencePiece does.
The decoder is the one mlx-lm recognises for its SentencePiece streaming detokenizer.
Known difference: a Unigram model (not LLaMA's BPE) matches control-token text such as "<s>" as
that piece, where SentencePiece spells it out.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE, Unigram

from kvp_mlx.errors import KVPError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# sentencepiece_model.proto enums
_UNIGRAM, _BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _read_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # needs the sentencepiece and protobuf packages
        raise KVPError(f"reading {path} needs the sentencepiece and protobuf packages: {e}") from None
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf creates the class at import time
    try:
        proto.ParseFromString(path.read_bytes())
    except FileNotFoundError:
        raise KVPError(f"tokenizer not found: {path}") from None
    except Exception as e:  # protobuf's DecodeError
        raise KVPError(f"{path} is not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise KVPError(f"{path} is not a SentencePiece model (no pieces)")
    return proto


def _bpe_merges(pieces: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges for HF BPE: every split of a piece into two pieces, ranked by the piece's score.

    SentencePiece's BPE repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece; ranking each pair by its result's score reproduces that.
    """
    ranked = []
    for piece, score in pieces:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(proto) -> normalizers.Normalizer | None:
    spec = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(r"\A +| +\z"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps) if steps else None


def vocab_size(model_path: str | Path) -> int:
    """Number of pieces in a SentencePiece model."""
    return len(_read_proto(Path(model_path)).pieces)


def build_tokenizer(model_path: str | Path) -> tuple[Tokenizer, dict]:
    """The `tokenizers` equivalent of a SentencePiece model, and its special-token names and ids."""
    path = Path(model_path)
    proto = _read_proto(path)
    trainer = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    if trainer.model_type == _BPE:
        normal = [(p.piece, p.score) for p in proto.pieces if p.type == _NORMAL]
        model: BPE | Unigram = BPE(
            vocab=vocab,
            merges=_bpe_merges(normal, vocab),
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    elif trainer.model_type == _UNIGRAM:
        model = Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise KVPError(f"{path}: only BPE and Unigram SentencePiece models are supported")
    tok = Tokenizer(model)
    normalizer = _normalizer(proto)
    if normalizer is not None:
        tok.normalizer = normalizer
    # control pieces (<s>, </s>) are special; user-defined pieces are matched verbatim
    tok.add_tokens(
        [
            AddedToken(p.piece, normalized=False, special=p.type == _CONTROL)
            for p in proto.pieces
            if p.type in (_CONTROL, _USER_DEFINED)
        ]
    )
    special = {}
    for role in ("unk", "bos", "eos", "pad"):
        idx = getattr(trainer, f"{role}_id")
        if 0 <= idx < len(pieces):
            special[role] = (pieces[idx][0], idx)
    if "bos" in special:
        bos, bos_id = special["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok, special


def write_tokenizer_files(model_path: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    Returns the special token ids (``{"bos_token_id": 1, "eos_token_id": 2, ...}``) for config.json.
    """
    out_dir = Path(out_dir)
    tok, special = build_tokenizer(model_path)
    tok.save(str(out_dir / "tokenizer.json"))
    names = {f"{role}_token": name for role, (name, _) in special.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": "bos" in special,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2, ensure_ascii=False))
    return {f"{role}_token_id": idx for role, (_, idx) in special.items() if role in ("bos", "eos")}


def pad_vocabulary(directory: str | Path, size: int) -> None:
    """Grow ``directory/tokenizer.json`` (a BPE or WordLevel model) to ``size`` pieces with unused
    ``<unused{i}>`` pieces that encoding never produces.

    For random-weight timing models: their embedding has a real model's size, which a small test
    tokenizer would not cover (see `kvp_mlx.model.MIN_TOKENIZER_COVERAGE`).
    """
    path = Path(directory) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    if not isinstance(vocab, dict):
        raise KVPError(f"{path}: only BPE and WordLevel tokenizers can be padded")
    used = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    for i in range(size):
        if i not in used:
            vocab[f"<unused{i}>"] = i
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
