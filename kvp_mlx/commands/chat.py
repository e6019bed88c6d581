"""`kvp-mlx chat`: a REPL over a session (kvp_mlx.chat.Chat), like mlx_lm.chat."""

from __future__ import annotations

import argparse
import sys

HELP = "chat with a model: a session keeps its caches across turns (like mlx_lm.chat)"
DESCRIPTION = """\
Chat with a model, as mlx_lm.chat does: type a message after '>> '; 'q' quits, 'r' resets the
conversation, 'h' prints help. The session keeps the base (and auxiliary) caches across turns, so
each turn prefills only the new message (with --method kvp: the auxiliary catches up and the
predictor fills the new positions). Standard output carries the conversation alone; after each
reply one line on standard error gives: ttft_s (seconds to the first token), prefilled (new tokens
filled this turn), reused (tokens the caches already held), predicted (positions holding predicted
K/V), generated, context (tokens held after the turn) and idle_repaired (positions the idle repair
recomputed before this turn). --repair idle (the default) makes predicted K/V exact while the chat
waits for your next message (the input is read in a background thread; the repair stops between
chunks of --repair-step-size positions once your line arrives). --prompt-cache-file F continues the session
saved in F if it exists, and saves it there (atomically) when the chat ends."""

# Flags taken over from `kvp-mlx generate` (same names, types, help), by destination.
GENERATE_FLAGS = ("model", "system_prompt", "max_kv_size", "prefill_step_size", "extra_eos_token", "dtype", "device",
                  "temp", "top_p", "min_p", "top_k", "min_tokens_to_keep", "xtc_probability", "xtc_threshold",
                  "seed", "repetition_penalty", "repetition_context_size", "presence_penalty", "frequency_penalty",
                  "logit_bias")


def _generate_parser() -> argparse.ArgumentParser:
    from kvp_mlx.commands import generate

    parser = argparse.ArgumentParser(add_help=False)
    generate.add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.chat import DEFAULT_REPAIR_STEP_SIZE, REPAIR_MODES

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--method", default=None, choices=["kvp", "base", "aux"],
                        help="prefill method of the session (default: kvp, base for a plain mlx-lm directory; "
                        "a continued session keeps its own)")
    parser.add_argument("--max-tokens", "-m", type=int, default=256, help="maximum tokens per reply (default: 256)")
    parser.add_argument("--prompt-cache-file", default=None, metavar="F.safetensors",
                        help="continue the session saved in this file if it exists; save it there on exit")
    parser.add_argument("--repair", choices=REPAIR_MODES, default="idle",
                        help="idle (default): repair predicted K/V while waiting for input; off: never")
    parser.add_argument("--repair-step-size", type=int, default=DEFAULT_REPAIR_STEP_SIZE,
                        help="positions per repair chunk: the longest a message waits for the idle repair "
                        f"(default: {DEFAULT_REPAIR_STEP_SIZE})")
    group = parser.add_argument_group("as kvp-mlx generate")
    for action in _generate_parser()._actions:
        if action.dest not in GENERATE_FLAGS:
            continue
        kw: dict = dict(dest=action.dest, default=action.default, help=action.help)
        if action.nargs is not None:
            kw["nargs"] = action.nargs
        if action.type is not None:
            kw["type"] = action.type
        group.add_argument(*action.option_strings, choices=action.choices, metavar=action.metavar, **kw)


def session_generation_kwargs(args: argparse.Namespace) -> dict:
    """The keywords of Session.stream_generate from the command line, built (and checked) by
    generate's own ``generation_kwargs``; what a session fixes when it is made is left out."""
    from kvp_mlx.commands.generate import generation_kwargs

    defaults = vars(_generate_parser().parse_args(["--prompt", "-"]))
    kwargs = generation_kwargs(argparse.Namespace(**{**defaults, **vars(args)}))
    for key in ("system_prompt", "prefill_response", "max_kv_size", "use_chat_template"):
        kwargs.pop(key, None)
    return kwargs


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.chat import Chat, open_session, prompt_cache_path
    from kvp_mlx.commands.generate import _with_extra_eos
    from kvp_mlx.generation import check_decoding
    from kvp_mlx.runtime_env import set_device
    from kvp_mlx.sampling import sampling_options

    kwargs = session_generation_kwargs(args)
    sampling_keys = set(sampling_options().__dataclass_fields__)
    sampling_options(**{k: v for k, v in kwargs.items() if k in sampling_keys}).check()  # before any work
    check_decoding(args.max_tokens, args.prefill_step_size, args.max_kv_size, None, 64, 0, 1)
    path = prompt_cache_path(args.prompt_cache_file) if args.prompt_cache_file else None
    set_device(args.device)
    from kvp_mlx.model import load

    model = _with_extra_eos(load(args.model, dtype=args.dtype), args.extra_eos_token)
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model, not trained): expect meaningless text",
              file=sys.stderr)
    session, loaded = open_session(model, path, method=args.method, max_kv_size=args.max_kv_size,
                                   system_prompt=args.system_prompt, prefill_step_size=args.prefill_step_size)
    if loaded:
        print(f"[chat] continuing the session in {path} ({len(session.tokens)} tokens, "
              f"{session.predicted_positions()} predicted)", file=sys.stderr)
    chat = Chat(session, generation=kwargs, repair=args.repair, repair_step_size=args.repair_step_size,
                save_to=path)
    return chat.run()
