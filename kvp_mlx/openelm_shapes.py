"""OpenELM architectures as corenet defines them, as mlx-lm ``openelm`` configs (per-layer lists).

corenet derives each layer's head count and FFN width from a few numbers (corenet-checkpoints.md):
``make_divisible`` rounding, and a linspace of qkv / ffn multipliers over the depth. The benchmark
builds these shapes with random weights (timing needs no trained weights and no download).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB_SIZE = 32000  # LLaMA-2 SentencePiece tokens (corenet pads its table to 32128)


def make_divisible(v: float, divisor: int) -> int:
    """corenet's rounding of a width to a multiple of ``divisor`` (never more than 10% down)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


@dataclass(frozen=True)
class OpenELMArch:
    layers: int
    model_dim: int
    head_dim: int
    ffn: tuple[float, float]  # multiplier of the first and last layer
    qkv: tuple[float, float]
    gqa_groups: int = 4
    select_layers: tuple[int, ...] | None = None  # layer-pruned: keep these layers of the full model


def _half_depth(layers: int, model_dim: int, head_dim: int) -> OpenELMArch:
    # corenet's "-0.50l": half the layers, multiplier ramps that stop one full-depth step short
    step = 1 / (layers - 1)
    return OpenELMArch(layers // 2, model_dim, head_dim, (0.5, 4.0 - 3.5 * step), (0.5, 1.0 - 0.5 * step))


ARCHS: dict[str, OpenELMArch] = {
    "OpenELM-270M": OpenELMArch(16, 1280, 64, (0.5, 4.0), (0.5, 1.0)),
    "OpenELM-450M": OpenELMArch(20, 1536, 64, (0.5, 4.0), (0.5, 1.0)),
    "OpenELM-1_1B": OpenELMArch(28, 2048, 64, (0.5, 4.0), (0.5, 1.0)),
    "OpenELM-3B": OpenELMArch(36, 3072, 128, (0.5, 4.0), (0.5, 1.0)),
    "OpenELM-1_1B-0.25l": OpenELMArch(28, 2048, 64, (0.5, 4.0), (0.5, 1.0), select_layers=tuple(range(0, 28, 4))),
    "OpenELM-1_1B-0.50l": _half_depth(28, 2048, 64),
    "OpenELM-3B-0.25l": OpenELMArch(36, 3072, 128, (0.5, 4.0), (0.5, 1.0), select_layers=tuple(range(0, 36, 4))),
    "OpenELM-3B-0.50l": _half_depth(36, 3072, 128),
}


def _ramp(pair: tuple[float, float], layers: int) -> list[float]:
    return [round(float(v), 2) for v in np.linspace(pair[0], pair[1], num=layers)]


def openelm_config(name: str, vocab_size: int = VOCAB_SIZE) -> dict:
    """The mlx-lm ``config.json`` dict of a named OpenELM architecture (exact per-layer shapes)."""
    if name not in ARCHS:
        raise ValueError(f"unknown OpenELM architecture '{name}' (known: {', '.join(ARCHS)})")
    a = ARCHS[name]
    q_heads = [
        make_divisible(a.model_dim * m, a.head_dim * a.gqa_groups) // a.head_dim for m in _ramp(a.qkv, a.layers)
    ]
    ffn = _ramp(a.ffn, a.layers)
    keep = list(a.select_layers) if a.select_layers is not None else list(range(a.layers))
    return {
        "model_type": "openelm",
        "num_transformer_layers": len(keep),
        "model_dim": a.model_dim,
        "head_dim": a.head_dim,
        "num_query_heads": [q_heads[i] for i in keep],
        "num_kv_heads": [q_heads[i] // a.gqa_groups for i in keep],
        "ffn_multipliers": [ffn[i] for i in keep],
        "ffn_dim_divisor": 256,
        "vocab_size": vocab_size,
        "normalize_qk_projections": True,
        "share_input_output_layers": True,
        "rope_freq_constant": 10000,
        "rms_norm_eps": 1e-6,
    }


def parameter_count(config: dict) -> int:
    """Parameters of an OpenELM config (tied embeddings counted once, norms included)."""
    d, hd = config["model_dim"], config["head_dim"]
    total = config["vocab_size"] * d + d  # embedding + final norm
    for q, kv, m in zip(config["num_query_heads"], config["num_kv_heads"], config["ffn_multipliers"]):
        ffn = make_divisible(m * d, config["ffn_dim_divisor"])
        total += d * (q + 2 * kv) * hd + q * hd * d + 3 * d * ffn + 2 * d + 2 * hd
    return total
