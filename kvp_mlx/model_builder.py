"""Build model directories locally: random-weight mlx-lm models of a given shape, layer-pruned
copies, a small byte-level tokenizer, and KV Prediction directories around them.

Used by the tests (tiny models for every architecture), the demo model before a trained one
exists, and the benchmark (real OpenELM shapes with random weights: timing needs no trained
weights and no download).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import save_config, save_model

from kvp_mlx.adapters import kv_shapes
from kvp_mlx.model import write_kvp_config
from kvp_mlx.predictor import KVPredictor, PredictorConfig, default_layer_mapping

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tiny_config(arch: str, n_layers: int = 2, vocab_size: int = 512) -> dict:
    """A small config of each supported architecture (GQA, and each arch's key-norm habit)."""
    if arch == "openelm":
        return {
            "model_type": "openelm", "head_dim": 16, "num_transformer_layers": n_layers,
            "model_dim": 64, "vocab_size": vocab_size, "ffn_dim_divisor": 32,
            "num_query_heads": [4] * n_layers, "num_kv_heads": [2] * n_layers,
            "ffn_multipliers": [1.0] * n_layers, "normalize_qk_projections": True,
            "share_input_output_layers": True, "rope_freq_constant": 10000, "rms_norm_eps": 1e-6,
        }
    common = {
        "hidden_size": 64, "num_hidden_layers": n_layers, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    }
    if arch in ("llama", "mistral"):
        return {"model_type": arch, **common, "tie_word_embeddings": False}
    if arch == "qwen2":
        return {"model_type": "qwen2", **common, "tie_word_embeddings": True}
    if arch == "qwen3":
        return {"model_type": "qwen3", **common, "head_dim": 16, "tie_word_embeddings": True}
    raise ValueError(f"no tiny config for architecture '{arch}'")


def num_layers(config: dict) -> int:
    return int(config.get("num_transformer_layers") or config["num_hidden_layers"])


def build_model(config: dict, seed: int | None = None) -> nn.Module:
    """An mlx-lm model of ``config``'s architecture with random weights (evaluated)."""
    if seed is not None:
        mx.random.seed(seed)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def layer_pruned(model: nn.Module, config: dict, keep: Sequence[int]) -> tuple[nn.Module, dict]:
    """A copy of ``model`` keeping only layers ``keep`` (in order), with its config (KVP-LP)."""
    n = num_layers(config)
    if not keep or any(not 0 <= i < n for i in keep) or list(keep) != sorted(set(keep)):
        raise ValueError(f"layers to keep must be increasing indices in [0, {n}), got {list(keep)}")
    cfg = copy.deepcopy(config)
    if "num_transformer_layers" in cfg:
        cfg["num_transformer_layers"] = len(keep)
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg[key] = [config[key][i] for i in keep]
    else:
        cfg["num_hidden_layers"] = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    weights = []
    for name, value in tree_flatten(model.parameters()):
        m = re.search(r"(^|\.)layers\.(\d+)\.", name)
        if m is None:
            weights.append((name, value))
        elif int(m.group(2)) in new_index:
            new = f"{m.group(1)}layers.{new_index[int(m.group(2))]}."
            weights.append((name[: m.start()] + new + name[m.end() :], value))
    pruned = build_model(cfg)
    pruned.load_weights(weights)
    return pruned, cfg


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


def default_tokenizer_texts() -> list[str]:
    """Text for the test/demo tokenizer: this package's own sources (always present, offline)."""
    return [p.read_text() for p in sorted(Path(__file__).parent.glob("*.py"))]


def save_lm_dir(directory: str | Path, model: nn.Module, config: dict, tokenizer_dir: str | Path) -> Path:
    """An ordinary mlx-lm model directory: config.json, model.safetensors, tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(directory, model)
    save_config(dict(config), directory / "config.json")
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy(src, directory / name)
    return directory


def make_predictor(
    base: nn.Module, aux: nn.Module, mapping: Sequence[int] | None = None, init: str = "random",
    seed: int | None = None,
) -> KVPredictor:
    """A predictor connecting ``aux`` to ``base``: ``init`` is "random" or "identity"."""
    base_kv, aux_kv = kv_shapes(base), kv_shapes(aux)
    mapping = list(mapping) if mapping is not None else default_layer_mapping(len(base_kv), len(aux_kv))
    if seed is not None:
        mx.random.seed(seed)
    predictor = KVPredictor(PredictorConfig(mapping, base_kv, aux_kv))
    if init == "identity":
        predictor.set_identity()
    elif init != "random":
        raise ValueError(f"unknown predictor init '{init}'")
    mx.eval(predictor.parameters())
    return predictor


def save_kvp_dir(
    directory: str | Path,
    base: nn.Module, base_config: dict,
    aux: nn.Module, aux_config: dict,
    predictor: KVPredictor,
    tokenizer_dir: str | Path,
    source: str,
    random_weights: bool = False,
) -> Path:
    """Write a complete KV Prediction directory (see kvp_mlx.model)."""
    directory = Path(directory)
    save_lm_dir(directory / "base", base, base_config, tokenizer_dir)
    save_lm_dir(directory / "aux", aux, aux_config, tokenizer_dir)
    predictor.save(directory)
    write_kvp_config(directory, source=source, random_weights=random_weights)
    return directory


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
                 source="random-weight demo pair (kvp_mlx.model_builder.build_random_demo)", random_weights=True)
    shutil.rmtree(directory / "_tokenizer")
    return directory


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m kvp_mlx.model_builder OUT_DIR   (builds the random-weight demo pair)")
    print(f"random-weight demo model written to {build_random_demo(sys.argv[1])}")
