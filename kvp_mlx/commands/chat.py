"""`kvp-mlx chat`: a REPL over a session (kvp_mlx.conversation.chat.Chat), like mlx_lm.chat."""

from __future__ import annotations

import argparse
import signal
import sys

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
saved in F if it exists, and saves it there (atomically) when the chat ends.

Bounded KV memory (EpiCache): --kv-budget M keeps the history in a compressed base-model cache of at
most M entries per KV head and layer between turns, and never more than M + B (B = --kv-block,
default 2048) while a turn runs. A turn appends its message and reply; while the chat waits for
your next message the cache is scored and evicted back to M with --kv-policy (epicache, the
default: the turns are the utterances, clustered into --kv-episodes episodes (default 4) the first
time the history is evicted and again whenever it has twice as many windows of 4 utterances; one
cache per episode, each evicted with its episode's prompt, and each new message goes to its
nearest episode's cache while the others catch up in idle time; the other policies are listed
below). A message that would take the cache past M + B is prefilled in blocks of B with eviction
after each. The reply
counts against the block (--max-tokens must be below --kv-block). Until the history exceeds the
budget nothing is evicted and the chat is exactly the plain one. The statistics line adds kv_entries
(entries per head the cache holds after the turn, the most over layers), kv_peak (the most it has
held), episode (the cache the message went to) and kv_mib (the KV memory of every cache). The
turns run on the base model (--method base; --method kvp/aux and --max-kv-size are refused with a
budget: to build a memory with KV Prediction use the Python API,
kvp_mlx.epicache.ConversationMemory(..., kvp_build=True).session()). A saved session records the
policy, budget, block and episodes and continues with them."""

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
    from kvp_mlx.conversation.chat import DEFAULT_REPAIR_STEP_SIZE, REPAIR_MODES
    from kvp_mlx.epicache.policies import available_policies, describe_policies
    from kvp_mlx.methods import session_methods

    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--method", default=None, choices=session_methods(),
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
    parser.epilog = "KV policies (--kv-policy):\n" + describe_policies(evicting=True)
    kv = parser.add_argument_group("bounded KV memory (EpiCache)")
    kv.add_argument("--kv-budget", type=int, default=None, metavar="M",
                    help="keep at most M KV entries per head and layer between turns (M + B during one)")
    kv.add_argument("--kv-policy", default=None, metavar="P",
                    help=f"what to keep: {', '.join(available_policies(evicting=True))} (default epicache; "
                    "listed below)")
    kv.add_argument("--kv-block", type=int, default=None, metavar="B",
                    help="block size: most entries a turn adds before eviction (default: 2048)")
    kv.add_argument("--kv-episodes", type=int, default=None, metavar="E",
                    help="episodes for --kv-policy epicache (default: 4)")
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


def kv_options(args: argparse.Namespace) -> dict | None:
    """The chat's KV budget from its flags (None: none asked), with one-line errors."""
    from kvp_mlx.epicache.policies import available_policies, get_policy
    from kvp_mlx.errors import KVPError

    given = [f for f, v in (("--kv-policy", args.kv_policy), ("--kv-block", args.kv_block),
                            ("--kv-episodes", args.kv_episodes)) if v is not None]
    if args.kv_budget is None:
        if given:
            raise KVPError(f"{given[0]} needs --kv-budget M (the KV entries per head and layer to keep)")
        return None
    policy = args.kv_policy if args.kv_policy is not None else "epicache"
    episodic = get_policy(policy, evicting=True, what="--kv-policy").episodic
    for flag, value in (("--kv-budget", args.kv_budget), ("--kv-block", args.kv_block),
                        ("--kv-episodes", args.kv_episodes)):
        if value is not None and value < 1:
            raise KVPError(f"{flag} must be a positive integer, got {value}")
    if args.kv_episodes is not None and not episodic:
        names = [p for p in available_policies(evicting=True) if get_policy(p).episodic]
        raise KVPError(f"--kv-episodes is for --kv-policy {' or '.join(names)}, not {policy}")
    if args.method not in (None, "base"):
        raise KVPError(f"--kv-budget compresses the base model's own cache turn by turn: it runs with --method base, "
                       f"not {args.method} (leave --method out)")
    if args.max_kv_size is not None:
        raise KVPError("--kv-budget and --max-kv-size both bound the cache: use one of them")
    block = args.kv_block if args.kv_block is not None else 2048
    if args.max_tokens >= block:
        raise KVPError(f"--max-tokens {args.max_tokens} must be below --kv-block {block}: a reply (and the message's "
                       "last token) must fit in a block")
    kv: dict = dict(policy=policy, budget=args.kv_budget)
    if args.kv_block is not None:
        kv["block"] = args.kv_block
    if args.kv_episodes is not None:
        kv["n_episodes"] = args.kv_episodes
    return kv


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.conversation.chat import Chat, open_session, prompt_cache_path
    from kvp_mlx.commands.generate import _with_extra_eos
    from kvp_mlx.generation import check_decoding
    from kvp_mlx.runtime_env import set_device
    from kvp_mlx.sampling import sampling_options

    kwargs = session_generation_kwargs(args)
    sampling_keys = set(sampling_options().__dataclass_fields__)
    sampling_options(**{k: v for k, v in kwargs.items() if k in sampling_keys}).check()  # before any work
    check_decoding(args.max_tokens, args.prefill_step_size, args.max_kv_size, None, 64, 0, 1)
    kv = kv_options(args)
    path = prompt_cache_path(args.prompt_cache_file) if args.prompt_cache_file else None
    set_device(args.device)
    from kvp_mlx.model import load

    model = _with_extra_eos(load(args.model, dtype=args.dtype), args.extra_eos_token)
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model, not trained): expect meaningless text",
              file=sys.stderr)
    method = "base" if kv is not None and args.method is None else args.method
    session, loaded = open_session(model, path, method=method, max_kv_size=args.max_kv_size,
                                   system_prompt=args.system_prompt,
                                   prefill_step_size=args.prefill_step_size, kv=kv)
    if loaded:
        print(f"[chat] continuing the session in {path} ({len(session.tokens)} tokens, "
              f"{session.predicted_positions()} predicted)", file=sys.stderr)
        from kvp_mlx.conversation.session_file import read_metadata

        if path is not None and read_metadata(path)["checksum"] is None:
            print(f"note: {path} was written by an older kvp-mlx without a checksum: loaded unverified "
                  "(it is saved with one)", file=sys.stderr)
    from kvp_mlx.progress import prefill_bar

    kwargs["prompt_progress_callback"] = prefill_bar()  # a long message's prefill: a bar on a terminal's stderr
    chat = Chat(session, generation=kwargs, repair=args.repair, repair_step_size=args.repair_step_size,
                save_to=path)
    status = chat.run()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # saved and ending: a late Ctrl-C cannot interrupt the exit
    return status
