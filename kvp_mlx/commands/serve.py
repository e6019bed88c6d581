"""`kvp-mlx serve`: an OpenAI-compatible HTTP server (the endpoints of mlx_lm.server)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Serve a model on an OpenAI-compatible HTTP API with the endpoints of mlx_lm.server:
POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health; streaming
(server-sent events) or not; mlx-lm server's sampling parameters, stop, max_tokens and logprobs.
Each request is prefilled with --method (kvp by default; a request may name another with a
"method" field), reusing the cached session that shares the longest token prefix with it, so only
the uncached suffix is predicted. Requests are served one at a time in arrival order. While idle
(--repair idle) the server recomputes exact base K/V for the cached sessions' predicted positions.
Binds to 127.0.0.1 unless --host says otherwise."""


def _size(text: str) -> int:
    from kvp_mlx.mlx_lm_private import parse_size

    try:
        value = parse_size(text)
    except Exception:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the size must be non-negative")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    add = parser.add_argument
    add("--model", help="KV Prediction directory or mlx-lm directory (default: the embedded demo model)")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    add("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    add("--method", default=None, help="default prefill method: kvp (default for a KV Prediction directory), "
        "base or aux; a request may choose another with a \"method\" field")
    add("--prompt-cache-size", type=int, default=10, help="most sessions kept for prefix reuse (default: 10)")
    add("--prompt-cache-bytes", type=_size, default=None, help="most bytes of cached sessions, e.g. 2GB")
    add("--repair", choices=["idle", "off"], default="idle",
        help="idle (default): repair cached sessions' predicted positions while no request waits")
    add("--repair-step-size", type=int, default=256,
        help="positions per repair chunk: the longest a new request waits for a repair (default: 256)")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    add("--max-tokens", type=int, default=512, help="default max_tokens of a request (default: 512)")
    add("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    add("--device", choices=["cpu", "gpu"], help="device (default: MLX's)")
    add("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")


def run(args: argparse.Namespace) -> int:
    import logging

    from kvp_mlx.errors import KVPError

    for name in ("port", "prompt_cache_size", "repair_step_size", "max_tokens", "prefill_step_size"):
        value = getattr(args, name)
        if value < (0 if name in ("port", "prompt_cache_size") else 1):
            raise KVPError(f"--{name.replace('_', '-')} must be {'non-negative' if name == 'port' else 'positive'}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    from kvp_mlx.methods import enter
    from kvp_mlx.model import load
    from kvp_mlx.runtime_env import set_device
    from kvp_mlx.server import KVPServer, ServerConfig

    set_device(args.device)
    model = load(args.model, dtype=args.dtype)
    method = enter(model, args.method, warm=True).name  # one line for a method this model cannot serve
    config = ServerConfig(
        model_id=args.model or "kvp-mlx-demo", method=method, max_tokens=args.max_tokens,
        prompt_cache_size=args.prompt_cache_size,
        prompt_cache_bytes=args.prompt_cache_bytes if args.prompt_cache_bytes is not None else 1 << 63,
        repair=args.repair == "idle", api_key=args.api_key, prefill_step_size=args.prefill_step_size,
        repair_step_size=args.repair_step_size,
    )
    try:
        server = KVPServer(model, config, args.host, args.port)
    except OSError as e:
        raise KVPError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if model.is_random:
        print("note: this model has RANDOM weights (a demo/timing model): expect meaningless text", file=sys.stderr)
    print(f"kvp-mlx serve: {config.model_id} (method {method}) on http://{server.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
