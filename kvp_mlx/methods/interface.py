"""The prefill interface: what a method declares, what it returns, and the registry.

A prefill method fills the decoder's cache for a prompt ``tokens`` [B, T] and returns the logits
for its last token. Each method declares itself once, as a :class:`PrefillMethod`: its name, its
options (name, type, default, help), its capabilities and its cost model (FLOPs and attention
scores of its time to first token). The CLI's flags and ``--help``, the benchmark's method list
and its FLOPs accounting are derived from these declarations, so adding a method touches its own
module and nothing else::

    register(PrefillMethod(
        name="rp", summary="random token pruning", prefill=prefill_rp,
        options=(Option("keep", float, 0.5, "fraction of prompt tokens kept", check=...),),
        capabilities=Capabilities(batch=False), cost=pruned_cost,
    ))

Methods see the model through :class:`PrefillModel` (what :class:`kvp_mlx.model.KVPModel`
provides), so this package never imports :mod:`kvp_mlx.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.adapters import counted_positions, held_positions
from kvp_mlx.errors import KVPError


class PrefillModel(Protocol):
    """The parts of a loaded model a prefill method uses."""

    base: nn.Module
    aux: nn.Module | None
    predictor: Any  # kvp_mlx.predictor.KVPredictor | None
    tokenizer: Any
    path: Path | None
    dtype: mx.Dtype


@dataclass
class PrefillResult:
    """A filled cache the decoder continues from."""

    cache: list  # one mlx-lm cache per decoder layer, holding every prompt position
    logits: mx.array  # [B, vocab]: the decoder's logits for the last prompt token
    decoder: nn.Module  # the model that decodes from ``cache`` (the base, or the aux for ``aux``)
    method: str
    info: dict = field(default_factory=dict)  # method-specific facts (e.g. tokens computed per layer)


@dataclass
class FilledCache:
    """The caches after a method processed some tokens, before the next token is run.

    Methods that can stop there (``fill``) let decoding run the prompt's last token through
    mlx-lm's own generation loop (``generate_step``), exactly as mlx-lm does after its prefill.
    """

    cache: list  # the decoder's cache, holding every processed position
    decoder: nn.Module
    # The auxiliary model's own cache, when the method made one (``kvp``): after a cold fill it
    # holds the same positions (a speculative-decoding draft that needs no prefill of its own); in
    # a conversation it may lag behind the decoder's (it has not seen the replies yet).
    draft_cache: list | None = None
    # The decoder positions [start, end) the last fill wrote with predicted (not exact) K/V.
    predicted: tuple[int, int] | None = None
    # Positions the decoder's cache holds, for a cache whose layers count none (recurrent states
    # only, e.g. mamba): set by whoever knows the tokens it absorbed (a session counts them).
    positions: int | None = None

    @property
    def offset(self) -> int:
        """Positions the decoder's cache holds (its positional layers: a hybrid's recurrent states
        count none; a cache of recurrent states only: :attr:`positions`)."""
        counted = counted_positions(self.cache)
        if counted is None and self.positions is not None:
            return self.positions
        return held_positions(self.cache)


@dataclass
class PeerRankResult:
    """What a rank of a distributed prefill that does not decode ends with: no cache."""

    method: str
    logits: mx.array | None  # the first-token logits when the method shares them, else None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One keyword option of a prefill method."""

    name: str  # the keyword argument of the prefill function
    type: type  # int, float, str or bool: CLI text is converted to it, API values are checked
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns what is wrong with a value, or None
    flag: str | None = None  # CLI flag; default ``--{method}-{name}`` with dashes
    cli: bool = True  # False: a Python-API-only option (an object no command line can give)

    def cli_flag(self, method: str) -> str:
        return self.flag or f"--{method}-{self.name.replace('_', '-')}"


@dataclass(frozen=True)
class Capabilities:
    needs_aux: bool = False  # needs an auxiliary model and a predictor (timed once per auxiliary)
    batch: bool = True  # accepts a batch of equal-length prompts (B > 1)
    decoder: str = "base"  # the model that decodes from the filled cache: "base" or "aux"
    extends_cache: bool = False  # can extend a non-empty cache at an offset (warm conversations)
    progress: bool = False  # its fill reports (processed, total) to a ``progress`` keyword (kvp_mlx.progress)
    # Reads or writes K/V per layer (capture, injection, pruning): needs an architecture kvp-mlx
    # supports (kvp_mlx.architectures); False for a method that only runs mlx-lm's own forward.
    kv_access: bool = True
    # The registry path whose per-architecture claim the method needs ("runahead": an entry's
    # ``not_runahead`` refuses it; kvp_mlx.architectures.path_problem), or None.
    architecture_path: str | None = None
    # Why the method cannot run inside one ordinary process (None: it can).
    needs_launch: str | None = None


@dataclass(frozen=True)
class Pass:
    """One pass of a model that a method's time to first token is made of.

    ``kind``: "fill" runs ``tokens`` positions into a cache in chunks (the last layer computes K/V
    only); "step" runs one token after ``offset`` cached positions through every layer and the LM
    head; "pruned" is a prefill whose layer i computes ``tokens_per_layer[i]`` positions.
    """

    model: str  # "base" or "aux"
    kind: str
    tokens: int = 1
    offset: int = 0
    tokens_per_layer: tuple[int, ...] = ()


@dataclass(frozen=True)
class Cost:
    """Work of a method's time to first token: FLOPs, attention scores (each an exp in softmax) and
    the model passes it runs (for cost models that count weight reads and kernel calls too; empty
    where the method does not declare them)."""

    flops: int
    attention_scores: int
    passes: tuple[Pass, ...] = ()


# fill(model, tokens [B, n], prefill_step_size, max_kv_size, warm=None, **options) -> FilledCache
# (with Capabilities.progress, also ``progress=``: a callback of (processed, total) positions):
# caches holding tokens[:, :n] (n may be 0). With ``warm`` (a FilledCache of this method holding a
# prefix of ``tokens``) the caches are extended in place to hold all n positions, written at their
# true positions (Capabilities.extends_cache).
FillFn = Callable[..., FilledCache]
# cost(model, prompt_tokens, prefill_step_size, batch, info) -> Cost, or None when the count needs
# facts only a run gives (``info`` is the prefill's ``result.info``, empty before a run).
CostFn = Callable[[PrefillModel, int, int, int, dict], "Cost | None"]
PrefillFn = Callable[..., "PrefillResult | PeerRankResult"]


@dataclass(frozen=True)
class PrefillMethod:
    """A prefill method's declaration.

    ``prefill`` fills the cache for the whole prompt and returns the last token's logits. A method
    that can stop one token short declares ``fill`` instead (or as well): then ``prefill`` is
    derived (fill ``tokens[:, :-1]``, one decoder step on the last token), and generation runs that
    last token through mlx-lm's own loop, so its logits processors, KV quantization and
    speculative decoding apply from the first token on.
    """

    name: str
    summary: str  # one line for --help
    prefill: PrefillFn | None = None  # prefill(model, tokens [B, T], prefill_step_size, **options)
    options: tuple[Option, ...] = ()
    capabilities: Capabilities = Capabilities()
    cost: CostFn | None = None
    fill: FillFn | None = None

    def __post_init__(self) -> None:
        if self.prefill is None and self.fill is None:
            raise ValueError(f"method '{self.name}' declares neither prefill nor fill")

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise KVPError(f"method '{self.name}' has no option '{name}' (its options: {known})")

    def resolve_options(self, given: dict[str, Any], source: str = "api") -> dict[str, Any]:
        """Checked option values: every key known, every value of the declared type, choice and range.

        ``source="cli"`` converts text to the declared type and names options by their flags.
        """
        out = {}
        for name, value in given.items():
            opt = self.option(name)
            label = opt.cli_flag(self.name) if source == "cli" else f"option '{name}' of method '{self.name}'"
            value = _convert(opt, value, label, parse_text=source == "cli")
            if opt.choices is not None and value not in opt.choices:
                raise KVPError(f"{label} must be one of {', '.join(map(str, opt.choices))}, got {value!r}")
            problem = opt.check(value) if opt.check is not None and value is not None else None
            if problem:
                raise KVPError(f"{label}: {problem}")
            out[name] = value
        return out


def _convert(opt: Option, value: Any, label: str, parse_text: bool) -> Any:
    """``value`` as the option's type: CLI text (``parse_text``) is parsed; API values must already
    have the type.

    Text options also take a richer object the method understands (a parsed lazy schedule, a
    runahead split table, a path), but never a number or a bool.
    """
    kind = opt.type
    if value is None:
        return None
    if parse_text and isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise KVPError(f"{label} expects true or false, got {value!r}")
            return text in ("true", "1", "yes")
        try:
            value = kind(text)
        except ValueError:
            raise KVPError(f"{label} expects {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is str:
        ok = not isinstance(value, (bool, int, float))
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise KVPError(f"{label} expects {kind.__name__}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise KVPError(f"{label} must be a finite number, got {value!r}")
    return value


_METHODS: dict[str, PrefillMethod] = {}


def register(method: PrefillMethod) -> PrefillMethod:
    """Make ``method`` available to ``model.prefill``, the CLI and the benchmark."""
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_specs() -> list[PrefillMethod]:
    return [_METHODS[name] for name in available_methods()]


def get_method(name: str) -> PrefillMethod:
    if name not in _METHODS:
        raise KVPError(f"unknown prefill method '{name}' (available: {', '.join(available_methods())})")
    return _METHODS[name]


def as_token_batch(tokens: Any, allow_empty: bool = False) -> mx.array:
    """Check and convert a prompt to int32 ``[B, T]``: 1-D becomes B=1; ragged is refused, and
    empty unless ``allow_empty`` (a cache filled with nothing yet)."""
    if isinstance(tokens, (list, tuple)):
        if len(tokens) == 0 and not allow_empty:
            raise KVPError("empty prompt: no tokens to process")
        if tokens and isinstance(tokens[0], (list, tuple, mx.array)):
            lengths = {len(t) for t in tokens}
            if len(lengths) > 1:
                raise KVPError(
                    f"ragged batch (prompt lengths {sorted(lengths)}): prompts in one batch must have "
                    "equal length for now"
                )
        tokens = mx.array(tokens)
    if not isinstance(tokens, mx.array):
        raise KVPError(f"tokens must be an mx.array or a list of ids, got {type(tokens).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise KVPError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or (tokens.shape[1] == 0 and not allow_empty):
        raise KVPError("empty prompt: no tokens to process")
    if tokens.size and mx.issubdtype(tokens.dtype, mx.floating):
        raise KVPError("tokens must be integer ids")
    return tokens.astype(mx.int32)
