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


def _plain_only_configs(n: int, vocab: int) -> dict[str, dict]:
    common = {"hidden_size": 64, "num_hidden_layers": n, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": vocab, "max_position_embeddings": 2048}
    return {
        "qwen3_next": {  # gated delta-net layers (ArraysCache) and attention layers (KVCache)
            "model_type": "qwen3_next", **common, "intermediate_size": 128, "linear_num_value_heads": 2,
            "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": 32, "mlp_only_layers": [], "moe_intermediate_size": 32,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "head_dim": 16,
            "full_attention_interval": 2,
        },
        "lfm2": {  # short convolutions (ArraysCache) and attention layers (KVCache)
            "model_type": "lfm2", **common, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
            "block_dim": 64, "block_multiple_of": 32, "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": False, "intermediate_size": 128,
            "layer_types": ["conv" if i % 2 == 0 else "full_attention" for i in range(n)],
        },
        "falcon_h1": {  # every layer holds a mamba-2 state and attention K/V (a CacheList)
            "model_type": "falcon_h1", **common, "head_dim": 16, "intermediate_size": 128, "mamba_d_conv": 4,
            "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_n_heads": 4,
            "mamba_chunk_size": 16, "rope_theta": 10000.0,
        },
        "mamba": {  # recurrent states only (no positions)
            "model_type": "mamba", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
            "state_size": 16, "num_hidden_layers": n, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
            "time_step_rank": 8, "tie_word_embeddings": True,
        },
        "deepseek_v3": {  # multi-head latent attention (MLA)
            "model_type": "deepseek_v3", **common, "num_key_value_heads": 4, "intermediate_size": 128,
            "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "qk_nope_head_dim": 16, "first_k_dense_replace": 1, "rms_norm_eps": 1e-6,
        },
    }


# Architectures mlx-lm runs and KV Prediction does not (hybrid, recurrent, MLA): their tiny configs,
# for the tests that check they run as plain mlx-lm models and are refused for K/V methods.
PLAIN_ONLY = ("qwen3_next", "lfm2", "falcon_h1", "mamba", "deepseek_v3")


def plain_only_config(model_type: str, n_layers: int = 2, vocab_size: int = 512) -> dict:
    return _plain_only_configs(n_layers, vocab_size)[model_type]


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
