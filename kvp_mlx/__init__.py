"""kvp-mlx: KV Prediction for a short time to first token on MLX.

Public API: :func:`load`, :func:`generate`, :func:`stream_generate`, :class:`KVPModel`
(``model.prefill(tokens, method=...)``), :class:`Session` (a conversation), :class:`KVPError`, and
the submodules in :data:`PUBLIC_MODULES` (their names that do not start with ``_``). Everything
else is internal; the lab in the repository's ``bench/`` uses only this (tests/test_boundaries.py).
"""

from kvp_mlx._blas import load_optimized_blas as _load_optimized_blas

_load_optimized_blas()  # must precede the first `import mlx.core`

from kvp_mlx.errors import KVPError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KVPError", "KVPModel", "Session", "generate", "load", "stream_generate"]

PUBLIC_MODULES = (
    "kvp_mlx",
    "kvp_mlx.errors",
    "kvp_mlx.model",  # load, KVPModel, load_lm, DEFAULT_MODEL_DIR
    "kvp_mlx.generation",  # generate, stream_generate, encode_prompt
    "kvp_mlx.conversation", "kvp_mlx.conversation.session",  # Session, TurnMemory
    "kvp_mlx.conversation.session_file",  # save_session, load_session
    "kvp_mlx.methods",  # the prefill-method registry and interface
    "kvp_mlx.methods.base", "kvp_mlx.methods.kvp", "kvp_mlx.methods.lazy_schedule",
    "kvp_mlx.architectures",  # one registry entry per architecture
    "kvp_mlx.adapters",  # how each architecture's raw K/V are captured and injected
    "kvp_mlx.predictor",  # KVPredictor, PredictorConfig, default_layer_mapping
    "kvp_mlx.building",  # build_model, layer_pruned, make_predictor, save_kvp_dir, save_lm_dir
    "kvp_mlx.tokenizer_files",
    "kvp_mlx.flops",  # FLOPs and attention scores of a model's work
    "kvp_mlx.runtime_env",  # devices, dtypes, BLAS
    "kvp_mlx.training", "kvp_mlx.training.data", "kvp_mlx.training.losses", "kvp_mlx.training.loop",
    "kvp_mlx.epicache", "kvp_mlx.epicache.loaders", "kvp_mlx.epicache.evaluate", "kvp_mlx.epicache.memory",
    "kvp_mlx.epicache.prefill", "kvp_mlx.epicache.synthetic", "kvp_mlx.epicache.budgets",
    "kvp_mlx.epicache.policies", "kvp_mlx.epicache.policies.baselines",
    "kvp_mlx.runahead", "kvp_mlx.runahead.group", "kvp_mlx.runahead.split",
    "kvp_mlx.convert", "kvp_mlx.convert.corenet_config",
    "kvp_mlx.mlx_lm_private",  # public wrappers of the private mlx-lm names kvp-mlx needs (model_classes)
    "kvp_mlx.testing",  # tiny models and tokenizers for tests and demos
)

_LAZY = {
    "load": "kvp_mlx.model",
    "KVPModel": "kvp_mlx.model",
    "generate": "kvp_mlx.generation",
    "stream_generate": "kvp_mlx.generation",
    "Session": "kvp_mlx.conversation.session",
}


def __getattr__(name: str):
    # The model stack (MLX, mlx-lm) is imported on first use: `import kvp_mlx` stays light.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvp_mlx' has no attribute {name!r}")
