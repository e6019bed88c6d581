"""The private mlx-lm names kvp-mlx uses, each imported here alone, with why and what would replace it.

A release of mlx-lm may rename or change any of them without notice; when one breaks, this module is
the place to fix. (``kvp_mlx.evaluate`` also overrides ``mlx_lm.evaluate.MLXLM._process_prompt``, a
private method of the class it extends.)
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import _BaseCache
from mlx_lm.server import _format_top_logprobs
from mlx_lm.utils import _get_classes

# The base class of every mlx-lm cache: a cache subclassing it gets the defaults (state, is_trimmable,
# from_state) that mlx-lm's cache functions read. A public cache base class or protocol would replace it.
BaseCache = _BaseCache


def model_classes(config: dict) -> tuple[Callable[..., nn.Module], type[BaseModelArgs]]:
    """mlx-lm's model class and ``ModelArgs`` class for a ``config.json`` dict, as ``mlx_lm.load``
    picks them (``_get_classes``): to build a model without loading weights. Replacement: a public
    ``mlx_lm.utils.get_model_classes``."""
    model_class, args_class = _get_classes(config)
    return model_class, args_class


def format_top_logprobs(logprobs: mx.array, top_n: int, tokenizer: Any) -> tuple[dict[str, Any], ...]:
    """The ``top_logprobs`` entries of one token exactly as ``mlx_lm.server`` writes them
    (``_format_top_logprobs``), so both servers answer alike. Replacement: a public formatter in mlx-lm."""
    return tuple(_format_top_logprobs(logprobs, top_n, tokenizer))


def rstrip_until(text: str, until: list[str]) -> str:
    """``text`` cut at the first of the ``until`` strings, as ``mlx_lm.evaluate``'s ``generate_until``
    cuts it (``_rstrip_until``), so generated answers score as under ``mlx_lm.evaluate``. Imports
    lm-eval. Replacement: a copy of its few lines."""
    from mlx_lm.evaluate import _rstrip_until

    return str(_rstrip_until(text, until))
