"""`kvp-mlx cache-prompt`: prefill a prompt into a session and save it (like mlx_lm.cache_prompt)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Prefill a prompt with a session's method (kvp by default: the auxiliary model and the predictor
fill the base cache) and save the session (both caches, the tokens, which positions hold predicted
K/V, the model's identity) atomically to --prompt-cache-file, in mlx-lm's prompt-cache format.
Continue it with `kvp-mlx generate --prompt-cache-file F --prompt ...` (the prompt becomes the next
turn; the file is not changed) or `kvp-mlx chat --prompt-cache-file F`. Unlike mlx_lm.cache_prompt,
the prompt is a whole turn (rendered with the chat template's generation prompt), and the next
prompt is the next turn; with --open-message it is rendered as mlx_lm.cache_prompt renders it (an
open user message the next prompt continues).

The file is mlx-lm's too: `mlx_lm.generate --prompt-cache-file F` continues it with the decoder's
own model (the base's cache, predicted positions included; the auxiliary's cache is left out), with
the same tokens as kvp-mlx for a --method base file written with --open-message. kvp-mlx generate
continues a file mlx_lm.cache_prompt wrote (--method base, exact; it stores no token ids)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.methods import session_methods

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--model", help="KV Prediction directory, mlx-lm directory or Hugging Face repo id "
        "(default: the embedded demo model)")
    add("--prompt", "-p", required=True, help="the prompt to cache; '-' reads standard input")
    add("--prompt-cache-file", required=True, metavar="F.safetensors", help="the file to save the session in")
    add("--method", default=None, choices=session_methods(),
        help="prefill method (default: kvp, or base for a plain mlx-lm directory)")
    add("--system-prompt", default=None, help="system prompt for the chat template")
    add("--open-message", action="store_true",
        help="render the prompt as mlx_lm.cache_prompt does: an open user message that the next prompt continues")
    add("--max-kv-size", type=int, default=None, help="maximum KV cache size (a rotating cache), fixed for the session")
    add("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk")
    add("--dtype", choices=["float32", "float16", "bfloat16"],
        help="compute dtype (default: float32 on cpu, the checkpoint's own dtype on gpu)")
    add("--device", choices=["cpu", "gpu"], help="device (default: MLX's)")


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.conversation.chat import cache_prompt, prompt_cache_path
    from kvp_mlx.errors import KVPError
    from kvp_mlx.generation import check_decoding
    from kvp_mlx.prompting import read_prompt_arg
    from kvp_mlx.runtime_env import set_device

    path = prompt_cache_path(args.prompt_cache_file)
    check_decoding(1, args.prefill_step_size, args.max_kv_size, None, 64, 0, 1)
    prompt = read_prompt_arg(args.prompt)
    if not prompt:
        raise KVPError("empty prompt")
    set_device(args.device)
    from kvp_mlx.model import load

    model = load(args.model, dtype=args.dtype)
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model, not trained)", file=sys.stderr)
    from kvp_mlx.progress import prefill_bar

    report = cache_prompt(model, prompt, path, method=args.method, max_kv_size=args.max_kv_size,
                          system_prompt=args.system_prompt, prefill_step_size=args.prefill_step_size,
                          open_message=args.open_message,
                          progress=prefill_bar())  # a bar on a terminal's stderr (kvp_mlx.progress)
    rate = report.tokens / report.seconds if report.seconds > 0 else float("inf")
    print(f"Processed {report.tokens} tokens in {report.seconds:.3f} s ({rate:.1f} tokens-per-sec), "
          f"{report.predicted} predicted")
    print(f"Peak memory: {report.peak_memory_gb:.3f} GB")
    print(f"Saved the session to {report.path}")
    return 0
