"""`kvp-mlx generate`: prefill a prompt with a method (kvp by default), then decode with mlx-lm's loop."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvp_mlx.commands.method_flags import add_method_arguments, method_option, method_options, method_summaries

DESCRIPTION = """\
Generate a continuation of a prompt, as mlx_lm.generate does (chat template by default, the same
sampling, penalty, KV-cache and speculative-decoding options), with a prefill method in front:
with --method kvp (the default for a KV Prediction directory) the auxiliary model processes the
prompt, the predictor fills the base model's KV cache, and the base model produces the first token
and decodes on its own. A plain mlx-lm directory runs --method base (with a note). Prints the text
as it streams, then mlx-lm's statistics and the time to first token (prompt token ids ready ->
first token available, in seconds). --verbose False prints the generated text alone. Without
--model the embedded demo model runs (offline)."""


def _str2bool(text: str) -> bool:
    if text.lower() in ("true", "t", "1", "yes"):
        return True
    if text.lower() in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{text}'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvp_mlx.methods import available_methods

    parser.description = DESCRIPTION
    add = parser.add_argument
    add("--model", help="KV Prediction directory, mlx-lm directory or Hugging Face repo id "
        "(default: the embedded demo model)")
    add("--prompt", "-p", required=True, help="the message (or raw prompt with --ignore-chat-template); "
        "'-' reads standard input")
    add("--method", default=None, choices=available_methods(),
        help=f"prefill method (default: kvp, or base for a plain mlx-lm directory). {method_summaries()}")
    add("--max-tokens", "-m", type=int, default=100, help="maximum number of tokens to generate (default: 100)")
    s = parser.add_argument_group("sampling (as mlx_lm.generate)")
    s.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    s.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling top-p in [0, 1] (default: 0, off)")
    s.add_argument("--min-p", type=float, default=0.0, help="min-p sampling in [0, 1] (default: 0, off)")
    s.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0, off)")
    s.add_argument("--min-tokens-to-keep", type=int, default=1, help="minimum tokens kept by min-p (default: 1)")
    s.add_argument("--xtc-probability", type=float, default=0.0, help="probability of XTC sampling per token")
    s.add_argument("--xtc-threshold", type=float, default=0.1, help="probability threshold of XTC candidates")
    s.add_argument("--seed", type=int, default=None, help="PRNG seed")
    s.add_argument("--repetition-penalty", type=float, default=None, help="multiplicative penalty for repeated "
                   "tokens (1: off)")
    s.add_argument("--repetition-context-size", type=int, default=20, help="tokens the repetition penalty sees")
    s.add_argument("--presence-penalty", type=float, default=None, help="additive penalty for present tokens")
    s.add_argument("--frequency-penalty", type=float, default=None, help="additive penalty proportional to counts")
    s.add_argument("--logit-bias", default=None, metavar="JSON", help='additive logit bias, e.g. \'{"13": -5.0}\'')
    c = parser.add_argument_group("chat template (as mlx_lm.generate)")
    c.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    c.add_argument("--ignore-chat-template", action="store_true", help="use the raw prompt without the template")
    c.add_argument("--chat-template-config", default=None, metavar="JSON",
                   help="extra arguments of apply_chat_template, as a JSON object")
    c.add_argument("--prefill-response", default=None, help="start of the assistant's response (chat template)")
    c.add_argument("--extra-eos-token", nargs="+", default=(), help="more tokens that end generation")
    k = parser.add_argument_group("KV cache and speculative decoding (as mlx_lm.generate)")
    k.add_argument("--max-kv-size", type=int, default=None, help="maximum KV cache size (a rotating cache)")
    k.add_argument("--kv-bits", type=int, default=None, help="bits of KV cache quantization (default: none)")
    k.add_argument("--kv-group-size", type=int, default=64, help="group size of KV cache quantization")
    k.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="with --kv-bits, quantize the cache from this many tokens on (default: 5000)")
    k.add_argument("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk")
    k.add_argument("--prompt-cache-file", default=None, metavar="F.safetensors",
                   help="continue the session saved by `kvp-mlx cache-prompt` or `kvp-mlx chat`: the prompt is "
                   "its next turn (the file is not changed); without --model, the model named in the file")
    k.add_argument("--draft", choices=["aux"], default=None,
                   help="speculative decoding with the auxiliary model as the draft (after a kvp prefill it "
                   "already holds the prompt's cache: no extra prefill)")
    k.add_argument("--draft-model", default=None, help="an mlx-lm model directory to draft with")
    k.add_argument("--num-draft-tokens", type=int, default=3, help="tokens drafted per step (default: 3)")
    o = parser.add_argument_group("output and checks")
    o.add_argument("--verbose", type=_str2bool, default=True, metavar="BOOL",
                   help="True (default): the text between separators, then statistics; False: the text alone")
    o.add_argument("--quiet", "-q", action="store_true", help="the same as --verbose False")
    o.add_argument("--strict-context", action="store_true",
                   help="refuse a prompt longer than the model's context (default: a warning)")
    o.add_argument("--compare", action="store_true",
                   help="run base and the chosen method (kvp when --method is base) greedily on the same prompt: "
                   "TTFT, prompt tokens/s, whether the first tokens agree and where the continuations diverge")
    o.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on cpu, the checkpoint's own dtype on gpu)")
    o.add_argument("--device", choices=["cpu", "gpu"], help="device (default: MLX's)")
    add_method_arguments(parser)


def _json_arg(text: str | None, flag: str) -> dict | None:
    from kvp_mlx.errors import KVPError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise KVPError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise KVPError(f"{flag} must be a JSON object")
    return value


def generation_kwargs(args: argparse.Namespace) -> dict:
    """Everything ``kvp_mlx.generation.stream_generate`` takes from the command line, checked."""
    from kvp_mlx.errors import KVPError

    bias = _json_arg(args.logit_bias, "--logit-bias") or {}
    try:
        logit_bias = {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError):
        raise KVPError("--logit-bias maps token ids to numbers, e.g. '{\"13\": -5.0}'") from None
    return dict(
        max_tokens=args.max_tokens, seed=args.seed, prefill_step_size=args.prefill_step_size,
        max_kv_size=args.max_kv_size, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start, num_draft_tokens=args.num_draft_tokens,
        system_prompt=args.system_prompt, use_chat_template=False if args.ignore_chat_template else None,
        chat_template_config=_json_arg(args.chat_template_config, "--chat-template-config"),
        prefill_response=args.prefill_response, strict_context=args.strict_context,
        temp=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k,
        min_tokens_to_keep=args.min_tokens_to_keep, xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=logit_bias,
    )


def run(args: argparse.Namespace) -> int:
    from kvp_mlx.errors import KVPError
    from kvp_mlx.generation import check_decoding
    from kvp_mlx.methods import default_method
    from kvp_mlx.progress import prefill_bar
    from kvp_mlx.prompting import read_prompt_arg
    from kvp_mlx.runtime_env import set_device
    from kvp_mlx.sampling import sampling_options

    verbose = args.verbose and not args.quiet
    kwargs = generation_kwargs(args)
    kwargs["prompt_progress_callback"] = prefill_bar(quiet=not verbose)  # kvp_mlx.progress: stderr, a tty only
    sampling_keys = set(sampling_options().__dataclass_fields__)
    sampling_options(**{k: v for k, v in kwargs.items() if k in sampling_keys}).check()  # before any work
    check_decoding(args.max_tokens, args.prefill_step_size, args.max_kv_size, args.kv_bits, args.kv_group_size,
                   args.quantized_kv_start, args.num_draft_tokens)
    if args.method is not None:
        method_options(args, args.method)  # a wrong method option fails here, before any work
    if args.method == "runahead":
        return _run_runahead(args, kwargs, verbose)
    if args.prompt_cache_file is not None:
        return _run_session(args, kwargs, verbose)
    prompt = read_prompt_arg(args.prompt)
    if not prompt:
        raise KVPError("empty prompt")
    set_device(args.device)
    from kvp_mlx.model import load

    model = _with_extra_eos(load(args.model, dtype=args.dtype), args.extra_eos_token)
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model, not trained): expect meaningless text",
              file=sys.stderr)
    method = args.method or default_method(model)
    if args.method is None and method == "base":
        print(f"note: {model.path} is a plain mlx-lm model (no auxiliary model, no predictor): using --method base",
              file=sys.stderr)
    draft_model = _load_draft(args.draft_model, model)
    if args.compare:
        return _compare(model, prompt, method, args, kwargs)
    _generate(model, prompt, method, verbose, dict(draft=args.draft, draft_model=draft_model,
                                                   method_options=method_options(args, method), **kwargs))
    return 0


def _generate(model, prompt: str, method: str, verbose: bool, kwargs: dict) -> None:
    """mlx-lm's output: verbose, the text between separators and the statistics; else the text alone."""
    from kvp_mlx.generation import generate, stream_generate

    if verbose:
        generate(model, prompt, method=method, verbose=True, **kwargs)
        return
    for piece in stream_generate(model, prompt, method=method, **kwargs):
        print(piece.text, end="", flush=True)
    print()


def _run_session(args: argparse.Namespace, kwargs: dict, verbose: bool) -> int:
    """``--prompt-cache-file F``: the prompt is the next turn of the session saved in F."""
    from kvp_mlx.conversation.chat import open_session, prompt_cache_path
    from kvp_mlx.errors import KVPError
    from kvp_mlx.generation import print_statistics
    from kvp_mlx.prompting import read_prompt_arg
    from kvp_mlx.runtime_env import set_device
    from kvp_mlx.conversation.session_file import read_metadata

    path = prompt_cache_path(args.prompt_cache_file)
    given = [flag for flag, on in (("--compare", args.compare), ("--draft", args.draft is not None),
                                   ("--draft-model", args.draft_model is not None),
                                   ("--prefill-response", args.prefill_response is not None)) if on]
    if given:
        raise KVPError(f"{', '.join(given)} cannot be used with --prompt-cache-file")
    meta = read_metadata(path)  # a missing, corrupt or foreign file fails here, before loading a model
    prompt = read_prompt_arg(args.prompt)
    if not prompt:
        raise KVPError("empty prompt")
    set_device(args.device)
    from kvp_mlx.model import load

    model = _with_extra_eos(load(args.model or meta["model"], dtype=args.dtype), args.extra_eos_token)
    if meta["mlx_lm"]:  # mlx_lm.cache_prompt's file: exact base K/V, the token ids unknown
        session = _mlx_lm_session(model, path, args, kwargs)
    else:
        session, _ = open_session(model, path, method=args.method, max_kv_size=args.max_kv_size,
                                  system_prompt=args.system_prompt, prefill_step_size=args.prefill_step_size)
    for key in ("system_prompt", "prefill_response", "max_kv_size"):
        kwargs.pop(key)
    options = method_options(args, str(session.method))
    if options and options != session.method_options:
        raise KVPError(f"the session in {path} was saved with its own --method {session.method} options")
    turn: Any = prompt
    if meta["continue"] == "message":  # the file ends in an open user message: mlx-lm's continuation
        from kvp_mlx.conversation.session_file import mlx_lm_continuation_ids

        turn = mlx_lm_continuation_ids(model.tokenizer, prompt, kwargs.pop("use_chat_template", None),
                                       kwargs.pop("chat_template_config", None))
    last = None
    for last in session.stream_generate(turn, **kwargs):
        if verbose and last.generation_tokens == 1:  # after the checks: an error leaves stdout empty
            print("=" * 10)
        print(last.text, end="", flush=True)
    print()
    if verbose and last is not None:
        print("=" * 10)
        print_statistics(last)
        turn = session.turns[-1]
        print(f"Session: {turn.reused_tokens} tokens reused from {path}, {turn.prefilled_tokens} prefilled")
    return 0


def _mlx_lm_session(model, path, args: argparse.Namespace, kwargs: dict):
    """The base session of a file mlx_lm.cache_prompt wrote (its history's token ids are unknown)."""
    from kvp_mlx.conversation.session_file import load_session
    from kvp_mlx.errors import KVPError

    if args.method not in (None, "base"):
        raise KVPError(f"{path} is an mlx-lm prompt cache (the base model's own cache): it continues with "
                       f"--method base, not {args.method}")
    penalties = [k for k in ("repetition_penalty", "presence_penalty", "frequency_penalty") if kwargs.get(k)]
    if penalties:
        raise KVPError(f"{path} is an mlx-lm prompt cache, which stores no token ids: "
                       f"--{penalties[0].replace('_', '-')} needs the history's tokens")
    session = load_session(model, path, mlx_lm_files=True)
    session.prefill_step_size = args.prefill_step_size
    if args.max_kv_size is not None:
        raise KVPError(f"{path} is an mlx-lm prompt cache: its cache size is fixed (leave out --max-kv-size)")
    return session


def _with_extra_eos(model, tokens):
    for token in tokens:
        model.tokenizer.add_eos_token(token)
    return model


def _load_draft(path: str | None, model):
    """``--draft-model DIR``: an mlx-lm model with the same tokenizer, in the model's dtype."""
    if path is None:
        return None
    from kvp_mlx.model import _cast, check_same_tokenizer, load_lm, resolve_model_path

    draft, tokenizer, _ = load_lm(resolve_model_path(path), "draft")
    check_same_tokenizer(model.tokenizer, tokenizer)
    _cast(draft, model.dtype)
    return draft


def _compare(model, prompt: str, method: str, args: argparse.Namespace, kwargs: dict) -> int:
    from kvp_mlx.compare import compare_methods
    from kvp_mlx.generation import print_statistics

    if args.temp != 0:
        print("note: --compare decodes both methods greedily (--temp is ignored) so their tokens can be compared",
              file=sys.stderr)
    result = compare_methods(model, prompt, method, method_options=method_options(args, method),
                             **{k: v for k, v in kwargs.items() if k != "seed"})
    for run in result.runs:
        print(f"========== {run.method}")
        print(run.text)
    print("=" * 10)
    for run in result.runs:
        print_statistics(run.last, run.method)
    base, other = result.runs
    where = result.diverge_at
    diverge = (f"identical for all {len(base.tokens)} tokens" if where is None
               else f"first differ at generated token {where}")
    print(f"TTFT base {base.last.ttft_s:.4f} s, {other.method} {other.last.ttft_s:.4f} s "
          f"(speedup {result.speedup:.2f}x); prompt tokens/s base {base.last.prompt_tps:.1f}"
          f", {other.method} {other.last.prompt_tps:.1f}")
    print(f"greedy continuations: first tokens agree: {'yes' if result.first_tokens_agree else 'no'}; {diverge}")
    return 0


def _run_runahead(args: argparse.Namespace, kwargs: dict, verbose: bool) -> int:
    """One rank of a launched group: the last rank decodes and prints, the others help the prefill."""
    from kvp_mlx.errors import KVPError
    from kvp_mlx.generation import encode_prompt
    from kvp_mlx.runahead import launched
    from kvp_mlx.runtime_env import set_device

    timeout = method_option(args, "runahead", "timeout_s")
    prompt = launched.read_prompt(args.prompt, timeout)
    if not prompt:
        raise KVPError("empty prompt")
    set_device(args.device)
    options = method_options(args, "runahead")
    model = _with_extra_eos(launched.load_on_rank(args.model, args.dtype, timeout), args.extra_eos_token)
    if not launched.is_output_rank(timeout, args.compare):
        ids = encode_prompt(model, prompt, system_prompt=kwargs["system_prompt"],
                            use_chat_template=kwargs["use_chat_template"],
                            chat_template_config=kwargs["chat_template_config"],
                            prefill_response=kwargs["prefill_response"])
        launched.help_prefill(model, ids, args.prefill_step_size, options, verbose)  # verbose: a line on stderr
        return 0
    if args.compare:
        return _compare(model, prompt, "runahead", args, kwargs)
    launched.ranks_ready(timeout, verbose)
    _generate(model, prompt, "runahead", verbose, dict(method_options=options, **kwargs))
    return 0
