"""tokenizer.json written from a SentencePiece model encodes exactly as SentencePiece does."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

import kvp_mlx  # noqa: F401
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
from mlx_lm.tokenizer_utils import load as load_tokenizer

from convert_helpers import train_sentencepiece
from kvp_mlx.errors import KVPError
from kvp_mlx.tokenizer_files import TOKENIZER_FILES, write_tokenizer_files

TEXTS = [
    "the quick brown fox",
    "   three leading spaces and a trailing one ",
    "digits 0123456789 and 42 and 3.14159",
    "unicode: café naïve Ωmega 日本語 🤖 über",
    "tabs\tand\nnewlines  double  spaces",
    "x<s>y literal control text </s>",
    "",
    " ",
]

# LLaMA-2's tokenizer.model: BPE, byte fallback, digits split, no normalization, spaces kept.
LLAMA_STYLE = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    remove_extra_whitespaces=False, character_coverage=1.0,
)


@pytest.fixture(scope="module", params=["llama_style", "bpe_nfkc", "unigram_nfkc"])
def sp_model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    extra = ["café naïve Ωmega 日本語 über 0123456789"] * 5
    if request.param == "llama_style":
        return train_sentencepiece(d, 400, extra_text=extra, **LLAMA_STYLE)
    model_type = "bpe" if request.param == "bpe_nfkc" else "unigram"
    # default normalization (nmt_nfkc, extra whitespace removed)
    return train_sentencepiece(d, 120, extra_text=extra, model_type=model_type, hard_vocab_limit=False)


def test_encodings_match_sentencepiece(sp_model, tmp_path):
    ids = write_tokenizer_files(sp_model, tmp_path)
    assert ids == {"bos_token_id": 1, "eos_token_id": 2}
    assert all((tmp_path / name).is_file() for name in TOKENIZER_FILES)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(tmp_path)
    unigram = "unigram" in sp_model.parent.name
    for text in TEXTS:
        if unigram and "<s>" in text:
            continue  # known difference for Unigram models, see kvp_mlx.tokenizer_files
        expected = [sp.bos_id()] + sp.encode(text)
        assert tok.encode(text) == expected, (text, sp.encode(text, out_type=str))
        if sp.unk_id() not in expected:  # SentencePiece spells <unk> as " ⁇ "
            assert tok.decode(expected[1:]) == sp.decode(expected[1:])


def test_mlx_lm_streams_it_with_the_spm_detokenizer(tmp_path):
    model = train_sentencepiece(tmp_path, 400, **LLAMA_STYLE)
    write_tokenizer_files(model, tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok.detokenizer, SPMStreamingDetokenizer)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    text = "the lazy dog jumps"
    detok = tok.detokenizer
    detok.reset()
    for t in tok.encode(text)[1:]:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_not_a_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(KVPError, match="not a SentencePiece model"):
        write_tokenizer_files(tmp_path / "tokenizer.model", tmp_path)
