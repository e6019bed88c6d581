"""The one way into a prefill method: :func:`enter` checks once, the returned call runs.

Every caller (generation, sessions, the server, evaluation, ``KVPModel.prefill``, launched ranks)
enters a method here. :func:`enter` checks what the method needs of the model (an auxiliary model
and a predictor), of the call (a warm cache to extend) and its options; the :class:`MethodCall` it
returns checks each prompt (shape, dtype, vocabulary range, batch) and the step size, then runs the
method's ``fill`` or ``prefill``. Nothing else calls a declaration's functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.errors import KVPError
from kvp_mlx.methods.interface import (
    FilledCache, PeerRankResult, PrefillMethod, PrefillModel, PrefillResult, as_token_batch, get_method,
    method_specs,
)
from kvp_mlx.prompting import check_id_list


def default_method(model: PrefillModel) -> str:
    """``kvp`` for a KV Prediction model, ``base`` for a plain mlx-lm directory."""
    return "kvp" if model.aux is not None and model.predictor is not None else "base"


def session_methods() -> list[str]:
    """The methods that extend a warm cache: those a session (a chat, a saved prompt, a server) runs."""
    return [m.name for m in method_specs() if m.fill is not None and m.capabilities.extends_cache]


def missing_models(model: PrefillModel, spec: PrefillMethod) -> str | None:
    """Why ``model`` cannot run ``spec`` (a base-only directory for a method needing the auxiliary), or None."""
    if spec.capabilities.needs_aux and (model.aux is None or model.predictor is None):
        return (f"method '{spec.name}' needs an auxiliary model and a predictor; {model.path} is a base-only "
                "model (use --method base)")
    return None


def architecture_problem(model: PrefillModel, spec: PrefillMethod) -> str | None:
    """Why ``spec`` cannot reach the K/V of ``model``'s architectures (kvp_mlx.architectures), or None."""
    if not spec.capabilities.kv_access:
        return None
    from kvp_mlx.architectures import kv_prediction_problem, path_problem

    path = spec.capabilities.architecture_path
    problem = path_problem(model.base, path) if path is not None else None
    if problem:
        return f"method '{spec.name}': {problem}"

    for part in (model.base, model.aux):
        problem = kv_prediction_problem(part) if part is not None else None
        if problem:
            return f"method '{spec.name}' needs per-layer K/V: {problem}"
    return None


@dataclass(frozen=True)
class MethodCall:
    """A method entered for a model with checked options; runs on prompts of that model."""

    model: PrefillModel
    spec: PrefillMethod
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fills(self) -> bool:
        """True when the method can stop one token short (mlx-lm's loop then runs the last token)."""
        return self.spec.fill is not None

    @property
    def decoder(self) -> nn.Module:
        """The model that decodes after this method (the base, or the auxiliary for ``aux``)."""
        aux = self.spec.capabilities.decoder == "aux" and self.model.aux is not None
        return self.model.aux if aux else self.model.base  # type: ignore[return-value]  # aux checked

    def fill(self, tokens: Any, prefill_step_size: int, max_kv_size: int | None = None,
             warm: FilledCache | None = None, progress: Callable[[int, int], None] | None = None) -> FilledCache:
        """Caches holding ``tokens`` [B, n] (n may be 0); ``warm`` (this method's caches of a prefix
        of ``tokens``) is extended in place. ``progress(processed, total)`` is reported to where the
        method declares it can (Capabilities.progress; kvp_mlx.progress)."""
        if self.spec.fill is None:
            raise KVPError(f"method '{self.name}' prefills whole prompts: it cannot stop one token short or "
                           "extend a warm cache")
        if warm is not None and not self.spec.capabilities.extends_cache:
            raise KVPError(f"method '{self.name}' cannot extend a warm cache")
        tokens = self._tokens(tokens, allow_empty=True)
        _check_step(prefill_step_size)
        reports = {"progress": progress} if progress is not None and self.spec.capabilities.progress else {}
        return self.spec.fill(self.model, tokens, prefill_step_size=prefill_step_size, max_kv_size=max_kv_size,
                              warm=warm, **reports, **self.options)

    def prefill(self, tokens: Any, prefill_step_size: int = 2048) -> PrefillResult | PeerRankResult:
        """The prefill of ``tokens`` [B, T]: the declared one, or ``fill`` of ``tokens[:, :-1]`` and
        one decoder step on the last token."""
        tokens = self._tokens(tokens, allow_empty=False)
        _check_step(prefill_step_size)
        if self.spec.prefill is not None:
            return self.spec.prefill(self.model, tokens, prefill_step_size=prefill_step_size, **self.options)
        assert self.spec.fill is not None  # a declaration has one or the other
        filled = self.spec.fill(self.model, tokens[:, :-1], prefill_step_size=prefill_step_size, **self.options)
        logits = filled.decoder(tokens[:, -1:], cache=filled.cache)[:, -1, :]
        return PrefillResult(filled.cache, logits, filled.decoder, self.name, {})

    def prefill_to_decode(self, tokens: Any, prefill_step_size: int = 2048) -> PrefillResult:
        """:meth:`prefill` where this process must decode next (refused on a helper rank of a
        distributed prefill, which holds no cache)."""
        result = self.prefill(tokens, prefill_step_size)
        if not isinstance(result, PrefillResult):
            raise KVPError(
                f"this process (rank {result.info.get('rank')}) helped a distributed '{self.name}' prefill but holds "
                "no cache: the last rank decodes (use kvp_mlx.methods.run_prefill on helper ranks)"
            )
        return result

    def check_ids(self, tokens: Any) -> None:
        """A one-line error unless ``tokens`` (ids [T] or [B, T]) are integers in this model's vocabulary."""
        self._tokens(tokens, allow_empty=True)

    def _tokens(self, tokens: Any, allow_empty: bool) -> mx.array:
        if isinstance(tokens, (list, tuple)):
            check_id_list(tokens, nested=True)
        if isinstance(tokens, mx.array) and tokens.size and not mx.issubdtype(tokens.dtype, mx.integer):
            raise KVPError(f"token ids must be integers, got an array of {str(tokens.dtype).rsplit('.', 1)[-1]}")
        tokens = as_token_batch(tokens, allow_empty=allow_empty)
        if tokens.shape[0] > 1 and not self.spec.capabilities.batch:
            raise KVPError(f"method '{self.name}' runs one prompt at a time (B=1); got a batch of {tokens.shape[0]}")
        check_vocabulary(tokens, vocab_size(self.model))
        return tokens


def vocab_size(model: PrefillModel) -> int | None:
    """The rows of the base model's embedding (which may exceed the tokenizer's vocabulary)."""
    size = getattr(getattr(model.base, "args", None), "vocab_size", None)
    if size is None:
        size = (getattr(model, "base_config", None) or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def check_vocabulary(tokens: mx.array, vocab: int | None) -> None:
    """A one-line error for an id outside ``[0, vocab)`` (an embedding lookup out of bounds crashes)."""
    if not tokens.size:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise KVPError(f"token id {low} is negative: token ids must lie in [0, {vocab or 'vocabulary size'})")
    if vocab is not None and high >= vocab:
        raise KVPError(f"token id {high} is outside this model's vocabulary: token ids must lie in [0, {vocab})")


def _check_step(prefill_step_size: Any) -> None:
    if isinstance(prefill_step_size, bool) or not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise KVPError("prefill_step_size must be a positive integer")


def enter(model: PrefillModel, method: str | None = None, options: dict[str, Any] | None = None, *,
          warm: bool = False, source: str = "api") -> MethodCall:
    """``method`` (default: :func:`default_method`) checked against ``model`` and, with ``warm``,
    able to extend a warm cache (a session's turns); ``options`` checked against its declaration
    (``source="cli"``: text converted, errors name the flags)."""
    if not all(hasattr(model, name) for name in ("base", "aux", "predictor", "tokenizer")):
        raise KVPError(f"model must be a KVPModel from kvp_mlx.load(...), got {type(model).__name__}")
    spec = get_method(method or default_method(model))
    problem = architecture_problem(model, spec) or missing_models(model, spec)
    if problem:
        raise KVPError(problem)
    if warm and (spec.fill is None or not spec.capabilities.extends_cache):
        raise KVPError(f"method '{spec.name}' cannot extend a warm cache: every turn would re-prefill the whole "
                       f"history (cold). Sessions run {', '.join(session_methods())}; use generate for one cold "
                       "prompt")
    return MethodCall(model, spec, spec.resolve_options(dict(options or {}), source))


def run_prefill(model: PrefillModel, tokens: Any, method: str, prefill_step_size: int = 2048,
                **options: Any) -> PrefillResult | PeerRankResult:
    """Enter ``method`` and prefill ``tokens`` [B, T] (on a helper rank of a distributed prefill:
    a :class:`PeerRankResult`)."""
    return enter(model, method, options).prefill(tokens, prefill_step_size)
