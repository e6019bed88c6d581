"""Evaluation in lm-evaluation-harness: an lm-eval model whose prompts are prefilled by a chosen
prefill method (``kvp``, ``base``, ``aux``, ``lazy``, ``rp``, ...), then scored or decoded by the
method's decoder (the base model, or the auxiliary for ``aux``).

``KVPLM`` is a sibling of mlx-lm's ``MLXLM`` (``mlx_lm.evaluate``): it reuses MLXLM's
loglikelihood (prefix grouping, truncation, scoring of continuations from a copy of the prompt's
cache) and replaces only the prompt's prefill (:meth:`KVPLM._process_prompt`) and generation
(:meth:`KVPLM.generate_until`: the method's prefill, then mlx-lm's ``generate_step`` from the
filled cache). ``loglikelihood_rolling`` (perplexity tasks) has no prompt to prefill: it is
MLXLM's, on the base model, whatever the method.

The paper's protocols ship as task files in ``kvp_mlx/eval_tasks`` (TriviaQA 1-shot as the KV
Prediction paper ran it, HumanEval pass@1 greedy and pass@10 sampled); they are always on the
task path. Needs ``pip install "kvp-mlx[eval]"`` (lm_eval, no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kvp_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from kvp_mlx.errors import KVPError
from kvp_mlx.mlx_lm_private import rstrip_until
from kvp_mlx.methods.interface import PrefillResult

TASKS_DIR = Path(__file__).parent / "eval_tasks"
DEFAULT_MAX_GEN_TOKENS = 256


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from mlx_lm import evaluate as mlx_lm_evaluate
    except ImportError as e:
        raise KVPError(f"evaluation needs lm-eval: pip install 'kvp-mlx[eval]' ({e})") from None
    return mlx_lm_evaluate


KVPLM: Any = None  # the registered class, once made


def make_lm_class() -> Any:
    """The lm-eval model class (registered as ``kvp-mlx``), built on first use so that importing
    kvp_mlx never imports lm-eval."""
    global KVPLM
    if KVPLM is not None:
        return KVPLM
    mlx_lm_evaluate = _lm_eval()
    from lm_eval.api.registry import register_model

    MLXLM: Any = mlx_lm_evaluate.MLXLM

    class _KVPLM(MLXLM):
        """lm-eval model: prompts prefilled by ``method``, continuations scored/decoded by its decoder."""

        def __init__(
            self,
            pretrained: Any = None,
            method: str = "kvp",
            method_options: dict | None = None,
            prefill_step_size: int = 2048,
            max_tokens: int | None = None,
            batch_size: int = 1,
            use_chat_template: bool = False,
            dtype: str | None = None,
            seed: int = 0,
        ) -> None:
            from lm_eval.api.model import LM

            from kvp_mlx.methods import enter
            from kvp_mlx.model import KVPModel, load

            LM.__init__(self)  # not MLXLM.__init__: the model is a KV Prediction directory
            self.kvp_model = pretrained if isinstance(pretrained, KVPModel) else load(pretrained, dtype=dtype)
            self.call = enter(self.kvp_model, method, method_options)
            if self.call.spec.capabilities.needs_launch:
                raise KVPError(
                    f"method '{method}' cannot run inside lm-eval's process: {self.call.spec.capabilities.needs_launch}"
                )
            self.method = method
            self.method_options = self.call.options
            self.tokenizer = self.kvp_model.tokenizer
            self.prefill_step_size = prefill_step_size
            self._max_tokens = max_tokens
            self._batch_size = batch_size
            self.use_chat_template = bool(use_chat_template)
            self._sampler = None
            self._seed = seed
            self._decoder: nn.Module | None = None

        # MLXLM scores continuations with ``self._model``: the decoder of the last prefill
        @property
        def _model(self) -> nn.Module:
            return self._decoder if self._decoder is not None else self.kvp_model.base

        @property
        def tokenizer_name(self) -> str:
            return str(self.kvp_model.path or "kvp-mlx").replace("/", "__")

        def _prefill(self, prompt: list[int]):
            if not prompt:
                raise KVPError("empty prompt: lm-eval gave an empty context and the tokenizer adds no BOS token")
            result = self.call.prefill(mx.array(prompt)[None], self.prefill_step_size)
            assert isinstance(result, PrefillResult)  # methods needing a launch are refused up front
            self._decoder = result.decoder
            return result

        def _process_prompt(self, prompt, step_size: int = 2048):
            result = self._prefill(list(prompt))
            logprobs = nn.log_softmax(result.logits.astype(mx.float32))
            mx.eval(logprobs)
            return logprobs, result.cache

        def loglikelihood_rolling(self, requests) -> list[float]:
            self._decoder = None  # no prompt to prefill: the base model scores the whole text
            return super().loglikelihood_rolling(requests)

        def generate_until(self, requests) -> list[str]:
            from tqdm import tqdm

            outs = []
            for req in tqdm(requests, desc=f"generate ({self.method})", disable=None):  # None: a terminal only
                context, options = req.args
                outs.append(self.generate_one(context, dict(options)))
            return outs

        def generate_one(self, context: str, options: dict) -> str:
            """Prefill ``context`` with the method, then decode with mlx-lm's ``generate_step`` from
            the filled cache until a stop string, an end-of-sequence token or ``max_gen_toks``."""
            from mlx_lm.generate import generate_step
            from mlx_lm.sample_utils import make_sampler

            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = self._max_tokens or int(options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
            temp = float(options.get("temperature", 0.0) or 0.0) if options.get("do_sample", False) else 0.0
            sampler = make_sampler(temp=temp, top_p=float(options.get("top_p", 0.0) or 0.0))
            if temp > 0:
                mx.random.seed(self._seed)
                self._seed += 1
            prompt = self.tokenizer.encode(context, add_special_tokens=not self.use_chat_template)
            result = self._prefill(list(prompt))
            logprobs = result.logits - mx.logsumexp(result.logits, axis=-1, keepdims=True)
            first = sampler(logprobs)
            mx.eval(first)
            tokens = [int(first.item())]  # type: ignore[arg-type]  # a token id
            eos = set(getattr(self.tokenizer, "eos_token_ids", None) or [])
            text = self.tokenizer.decode(tokens)
            if tokens[0] not in eos and max_new > 1 and not any(s in text for s in until):
                steps = generate_step(
                    first.reshape(-1),
                    result.decoder,
                    max_tokens=max_new - 1,
                    sampler=sampler,
                    prompt_cache=result.cache,
                )
                for step, _ in steps:
                    token_id = int(step)
                    if token_id in eos:
                        break
                    tokens.append(token_id)
                    text = self.tokenizer.decode(tokens)
                    if any(s in text for s in until):
                        break
                steps.close()
            if tokens and tokens[-1] in eos:
                tokens = tokens[:-1]
            return rstrip_until(self.tokenizer.decode(tokens), until)

    _KVPLM.__name__ = _KVPLM.__qualname__ = "KVPLM"
    KVPLM = register_model("kvp-mlx")(_KVPLM)
    return KVPLM


def task_manager(include_paths: list[str | Path] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager with the bundled protocols (and ``include_paths``) on its path;
    ``include_defaults``: lm-eval's own tasks too (indexing them takes a while)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include_paths or [])]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def evaluate(
    model: Any = None,
    *,
    method: str = "kvp",
    method_options: dict | None = None,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    apply_chat_template: bool = False,
    include_paths: list[str | Path] | None = None,
    prefill_step_size: int = 2048,
    max_tokens: int | None = None,
    confirm_run_unsafe_code: bool = False,
    dtype: str | None = None,
    seed: int = 0,
) -> dict:
    """Run lm-eval ``tasks`` with prompts prefilled by ``method``; lm-eval's results dict.

    ``model``: a directory, repo id, a loaded KVPModel, or None for the embedded demo model.
    Chat templates are off by default (base models, the paper's protocol).
    """
    _lm_eval()
    from lm_eval import evaluator

    cls = make_lm_class()
    lm = cls(
        model,
        method=method,
        method_options=method_options,
        prefill_step_size=prefill_step_size,
        max_tokens=max_tokens,
        use_chat_template=apply_chat_template,
        dtype=dtype,
        seed=seed,
    )
    manager = task_manager(include_paths, include_defaults=False)
    if any(not manager.match_tasks([t]) for t in tasks):  # not bundled nor included: lm-eval's own tasks
        manager = task_manager(include_paths)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise KVPError(
            f"unknown lm-eval task(s) {', '.join(unknown)} (bundled: {', '.join(bundled_tasks())}; "
            "add task folders with --include-path)"
        )
    try:
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=True,
        )
    except ValueError as e:
        if "unsafe" in str(e).lower() or "confirm_run_unsafe_code" in str(e):
            raise KVPError(f"{e} (pass --confirm-run-unsafe-code to execute generated code)") from None
        raise
    results["kvp_mlx"] = {
        "model": str(lm.kvp_model.path),
        "method": method,
        "method_options": lm.method_options,
        "prefill_step_size": prefill_step_size,
    }
    return results


def bundled_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def scores(results: dict) -> dict[str, dict[str, float]]:
    """task -> metric -> value, numbers only (lm-eval's ``results`` section)."""
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in results.get("results", {}).items()
    }


def write_results(results: dict, out: Path) -> Path:
    """OUT/results.json (scores, config, samples) and print a table of the scores."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def markdown(results: dict) -> str:
    meta = results.get("kvp_mlx", {})
    lines = [
        f"model {meta.get('model')}, method {meta.get('method')} {meta.get('method_options') or ''}",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    for task, metrics in scores(results).items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(lines)
