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

    check_include_paths(include_paths or [])
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
    loaded = [load_task(manager, t) for t in tasks]  # datasets read (or fetched) before any scoring
    try:
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=loaded,
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


def _any_tag_loader() -> Any:
    """PyYAML's safe loader reading lm-eval's tags (``!function``) as nothing: lm-eval resolves them."""
    import yaml

    class AnyTag(yaml.SafeLoader):
        pass

    AnyTag.add_multi_constructor("", lambda loader, suffix, node: None)
    return AnyTag


def check_include_paths(paths: list[str | Path]) -> None:
    """Each ``--include-path`` exists, and every task YAML under it parses (lm-eval skips a malformed
    one silently, and the task is then only "unknown")."""
    import yaml

    for root in map(Path, paths):
        if not root.exists():
            raise KVPError(f"--include-path {root} does not exist")
        if not root.is_dir():
            raise KVPError(f"--include-path {root} is not a directory (give the folder holding task YAML files)")
        for path in sorted(root.glob("**/*.yaml")):
            try:
                config = yaml.load(path.read_text(encoding="utf-8"), Loader=_any_tag_loader())  # noqa: S506
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                mark = getattr(e, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                raise KVPError(f"task file {path} is not valid YAML: {getattr(e, 'problem', None) or _first_line(e)}"
                               f"{where}") from None
            if not isinstance(config, dict):
                raise KVPError(f"task file {path} must hold a mapping of task settings, got {type(config).__name__}")


def load_task(manager: Any, name: str) -> Any:
    """lm-eval's task (or group) ``name`` with its dataset loaded; a dataset that cannot be read (a
    missing or malformed data file, the hub offline) is a one-line error naming the task."""
    import os

    try:
        loaded = manager.load([name])
    except Exception as e:  # datasets and lm-eval raise many types for a dataset they cannot read
        detail = f"{type(e).__name__}: {_first_line(e)}"
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not e:
            detail += f" ({type(cause).__name__}: {_first_line(cause)})"
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("", "0")]
        hint = f"; {offline[0]} is set: the dataset must be in the local cache" if offline else ""
        raise KVPError(f"task '{name}'{_task_files(manager, name)}: cannot load its dataset: {detail}{hint}") from None
    if name in loaded["groups"]:
        return loaded["groups"][name]
    return loaded["tasks"].get(name) or list(loaded["tasks"].values())  # a tag: its tasks


def _task_files(manager: Any, name: str) -> str:
    """`` (TASK.yaml, data files: ...)`` for a task read from a YAML file naming local data files."""
    import yaml

    path = getattr(manager.task_index.get(name), "yaml_path", None)
    if path is None:
        return ""
    try:
        config = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_any_tag_loader())  # noqa: S506
        files = (config.get("dataset_kwargs") or {}).get("data_files")
    except Exception:  # only a hint for the message
        files = None
    if isinstance(files, dict):
        files = list(files.values())
    return f" ({path}, data files: {files})" if files else f" ({path})"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


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
