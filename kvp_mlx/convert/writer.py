"""Writing the output: an atomic directory, and mlx-lm model directories inside it."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import openelm
from mlx_lm.utils import quantize_model, save_config, save_model

from kvp_mlx.errors import KVPError


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``.

    On any exception the temporary directory is removed and ``target`` is left as it was. An
    existing ``target`` is refused unless ``force``; then it is replaced only once the new
    directory is complete.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise KVPError(f"output {target} already exists (pass --force to replace it)")
    if target.exists() and not target.is_dir():
        raise KVPError(f"output {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal directory's mode
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "dir")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    group_size: int = 64


def _count_quantized(model: nn.Module) -> tuple[int, int]:
    quantized = total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized += 1
            total += 1
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            total += 1
    return quantized, total


def write_mlx_model(
    directory: Path,
    config: dict,
    weights: dict[str, mx.array],
    quantization: Quantization | None = None,
    label: str = "model",
) -> dict:
    """Save an mlx-lm openelm directory (``config.json`` + ``model.safetensors``); returns the config.

    The weights are loaded into mlx-lm's own model class first, so anything mlx-lm could not load
    fails here. Quantization uses mlx-lm's `quantize_model`, which skips layers whose input
    dimension is not a multiple of the group size; the count is reported on stderr.
    """
    model: nn.Module = openelm.Model(openelm.ModelArgs.from_dict(config))
    model.load_weights(list(weights.items()), strict=True)
    if quantization is not None:
        with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints its bits-per-weight line
            model, config = quantize_model(
                model, config, group_size=quantization.group_size, bits=quantization.bits
            )
        done, total = _count_quantized(model)
        skipped = f"; {total - done} left in float (input dim not a multiple of {quantization.group_size})"
        print(
            f"{label}: quantized {done} of {total} linear/embedding layers to {quantization.bits} bits"
            + (skipped if done < total else ""),
            file=sys.stderr,
        )
        if done == 0:
            raise KVPError(
                f"{label}: no layer can be quantized with group size {quantization.group_size}; "
                "pick a group size that divides the model's dimensions"
            )
    save_model(directory, model)
    save_config(dict(config), directory / "config.json")
    return config
