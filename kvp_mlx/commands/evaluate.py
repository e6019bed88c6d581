"""`kvp-mlx evaluate`: lm-eval tasks with prompts prefilled by a chosen method (kvp_mlx.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Run lm-evaluation-harness tasks with every prompt prefilled by --method (kvp, base, aux, lazy, rp,
...); continuations are scored (loglikelihood) or decoded (generate_until) by the method's
decoder from the filled cache. Bundled protocols (always on the task path): triviaqa_kvp
(the KV Prediction paper's 1-shot TriviaQA), humaneval_kvp (pass@1, greedy) and
humaneval_kvp_pass10 (pass@10, sampled; both execute generated code only with
--confirm-run-unsafe-code). Datasets come from the Hugging Face hub, or from local task folders
given with --include-path. Chat templates are off unless --apply-chat-template."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.commands.method_flags import add_method_arguments, method_summaries

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", help="model directory or repo id (default: the embedded demo model)")
    parser.add_argument("--method", default="kvp", help=f"prefill method (default: kvp): {method_summaries()}")
    parser.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, help="examples per task (an integer) or a fraction (< 1)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="wrap prompts in the tokenizer's chat template (off: base models, the paper's protocol)")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of extra task YAML files")
    parser.add_argument("--output-dir", help="write results.json (scores, config, every sample) there")
    parser.add_argument("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk")
    parser.add_argument("--max-tokens", type=int, help="cap on generated tokens (default: the task's max_gen_toks)")
    parser.add_argument("--confirm-run-unsafe-code", action="store_true",
                        help="allow tasks that execute generated code (HumanEval)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of few-shot choice and sampling")
    add_method_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from kvp_mlx import evaluate as ev
    from kvp_mlx.commands.method_flags import method_options
    from kvp_mlx.errors import KVPError

    from kvp_mlx.commands.output_paths import check_output_dir

    if args.output_dir:
        check_output_dir(args.output_dir, "--output-dir", ("results.json",))
    options = method_options(args, args.method)
    tasks = [t for t in args.tasks.replace(",", " ").split() if t]
    if not tasks:
        raise KVPError("--tasks is empty")
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise KVPError("--limit must be positive")
        limit = int(limit) if limit >= 1 else limit
    results = ev.evaluate(
        args.model, method=args.method, method_options=options, tasks=tasks, num_fewshot=args.num_fewshot,
        limit=limit, apply_chat_template=args.apply_chat_template, include_paths=args.include_path,
        prefill_step_size=args.prefill_step_size, max_tokens=args.max_tokens,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code, dtype=args.dtype, seed=args.seed,
    )
    print(ev.markdown(results))
    if args.output_dir:
        print(f"wrote {ev.write_results(results, Path(args.output_dir))}")
    return 0
