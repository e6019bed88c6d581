"""Test and demo support: tiny configs of every supported architecture, a small byte-level
tokenizer, and a random-weight demo pair (``python -m kvp_mlx.testing OUT_DIR``).

The model-building functions the tests use live in :mod:`kvp_mlx.building`; they are imported
here so a test needs one module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

from kvp_mlx import architectures
from kvp_mlx.building import (  # noqa: F401  (re-exported for tests)
    TOKENIZER_FILES, build_model, layer_pruned, make_predictor, num_layers, save_kvp_dir, save_lm_dir,
)


def tiny_config(arch: str, n_layers: int = 2, vocab_size: int = 512) -> dict:
    """A small config of a registered architecture (hidden size 64, GQA where it has it, each
    architecture's key-norm, NoPE and sliding-window habits): its registry entry's ``tiny_config``.

    ``arch`` is a model_type (``gemma3`` is accepted for mlx-lm's gemma3_text).
    """
    return architectures.tiny_config(arch, n_layers, vocab_size)


def convert_kvp_dir(
    src: str | Path, dst: str | Path, *, q_bits: int | None = None, q_group_size: int | None = None,
    dtype: str | None = None,
) -> Path:
    """A KV Prediction directory ``dst`` whose base and auxiliary are ``src``'s put through
    mlx-lm's own converter (``mlx_lm.convert``): quantized to ``q_bits`` (with ``q_group_size``)
    and/or cast to ``dtype``; the predictor and kvp_config.json are copied unchanged."""
    import contextlib
    import io

    from mlx_lm.convert import convert

    from kvp_mlx.model import KVP_CONFIG
    from kvp_mlx.predictor import PREDICTOR_CONFIG, PREDICTOR_WEIGHTS

    src, dst = Path(src), Path(dst)
    config = json.loads((src / KVP_CONFIG).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for part in (config.get("base", "base"), config.get("aux", "aux")):
        with contextlib.redirect_stdout(io.StringIO()):  # mlx_lm.convert prints [INFO] lines
            convert(str(src / part), str(dst / part), quantize=q_bits is not None, q_bits=q_bits,
                    q_group_size=q_group_size, dtype=dtype)
    for name in (KVP_CONFIG, PREDICTOR_CONFIG, PREDICTOR_WEIGHTS):
        shutil.copy(src / name, dst / name)
    return dst


def build_byte_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer (BOS ``<s>``, EOS ``</s>``) and save files mlx-lm loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2))
    return directory


TOKENIZER_TEXT_MODULES = ("argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "string.py", "shlex.py")


def default_tokenizer_texts() -> list[str]:
    """Text for the test/demo tokenizer: a fixed set of the standard library's sources (always present,
    offline, and unchanged by edits to this package, so tests see the same tokens from commit to commit)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in TOKENIZER_TEXT_MODULES]


def build_random_demo(directory: str | Path, seed: int = 0) -> Path:
    """A random-weight OpenELM pair big enough to show the TTFT gap (until a trained demo exists).

    Base: 8 layers, dim 512; auxiliary: 2 layers, dim 256; default layer mapping; random predictor.
    """
    directory = Path(directory)
    tok = build_byte_tokenizer(directory / "_tokenizer", default_tokenizer_texts(), 2048)
    base_cfg = tiny_config("openelm", n_layers=8, vocab_size=2048)
    base_cfg.update(model_dim=512, head_dim=64, num_query_heads=[8] * 8, num_kv_heads=[2] * 8,
                    ffn_multipliers=[2.0] * 8, ffn_dim_divisor=256)
    aux_cfg = tiny_config("openelm", n_layers=2, vocab_size=2048)
    aux_cfg.update(model_dim=256, head_dim=64, num_query_heads=[4] * 2, num_kv_heads=[1] * 2,
                   ffn_multipliers=[2.0] * 2, ffn_dim_divisor=256)
    base, aux = build_model(base_cfg, seed=seed), build_model(aux_cfg, seed=seed + 1)
    predictor = make_predictor(base, aux, seed=seed + 2)
    save_kvp_dir(directory, base, base_cfg, aux, aux_cfg, predictor, tok,
                 source="random-weight demo pair (kvp_mlx.testing.build_random_demo)", random_weights=True)
    shutil.rmtree(directory / "_tokenizer")
    return directory


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m kvp_mlx.testing OUT_DIR   (builds the random-weight demo pair)")
    print(f"random-weight demo model written to {build_random_demo(sys.argv[1])}")
