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
the uncached suffix is predicted. Requests are decoded together in one batch (mlx-lm's
BatchGenerator, up to --decode-concurrency) or, with --decode-concurrency 1 and for requests that
cannot batch, served one at a time in arrival order. While idle
(--repair idle) the server recomputes exact base K/V for the cached sessions' predicted positions.
Binds to 127.0.0.1 unless --host says otherwise."""


SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "T": 10**12, "TB": 10**12}  # decimal, as mlx_lm.server's --prompt-cache-bytes


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GB``, ``500MB``, ``1.5G``, ``1KB`` or ``4096`` (mlx_lm.server's
    sizes, plus kilobytes and terabytes); a one-line argparse error otherwise."""
    number = text.strip()
    unit = number.lstrip("0123456789.")
    number = number[: len(number) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    factor = SIZE_UNITS.get(unit.strip().upper())
    if factor is None or not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1KB, got '{text}'")
    return int(value * factor)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    add = parser.add_argument
    add("--model", help="KV Prediction directory or mlx-lm directory (default: the embedded demo model)")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    add("--port", type=int, default=8080, help="port, 0 to 65535 (default: 8080; 0 picks a free one)")
    add("--method", default=None, help="default prefill method: kvp (default for a KV Prediction directory), "
        "base or aux; a request may choose another with a \"method\" field")
    add("--prompt-cache-size", type=int, default=10,
        help="most sessions kept for prefix reuse (default: 10; 0 keeps none, as mlx_lm.server)")
    add("--prompt-cache-bytes", type=parse_size, default=None,
        help="most bytes of cached sessions: a number with an optional unit B, KB, MB, GB or TB (K, M, G, T; "
        "decimal), e.g. 2GB or 500MB")
    add("--repair", choices=["idle", "off"], default="idle",
        help="idle (default): repair cached sessions' predicted positions while no request waits")
    add("--repair-step-size", type=int, default=256,
        help="positions per repair chunk: the longest a new request waits for a repair (default: 256)")
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints (a --host "
        "other than loopback without one is warned about)")
    add("--max-tokens", type=int, default=512,
        help="max_tokens of a request that gives none (default: 512), cut to what is left of the model's "
        "context after the prompt when the model declares one; a request asking for more than fits is a 400")
    add("--prefill-step-size", type=int, default=2048, help="prompt tokens per prefill chunk")
    add("--decode-concurrency", type=int, default=32,
        help="most requests decoding together in one batch (mlx-lm's BatchGenerator; default: 32, as "
        "mlx_lm.server; 1 serves one request at a time). Requests that cannot batch (several completions "
        "prompts, n > 1, echo, integer logprobs, methods other than kvp and base, seeded sampling, hybrid "
        "or sliding-window caches) are served alone")
    add("--prompt-concurrency", type=int, default=8,
        help="new requests filled (through their sessions, one after the other) between two decoding steps "
        "while batching (default: 8, as mlx_lm.server)")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    add("--device", choices=["cpu", "gpu"], help="device (default: MLX's)")
    add("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")


def run(args: argparse.Namespace) -> int:
    import logging

    from kvp_mlx.errors import KVPError

    if not 0 <= args.port <= 65535:
        raise KVPError(f"--port must lie in [0, 65535] (0 picks a free port), got {args.port}")
    if args.prompt_cache_size < 0:
        raise KVPError(f"--prompt-cache-size must be non-negative (0 keeps no sessions), got {args.prompt_cache_size}")
    for name in ("repair_step_size", "max_tokens", "prefill_step_size", "decode_concurrency", "prompt_concurrency"):
        if getattr(args, name) < 1:
            raise KVPError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
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
        repair_step_size=args.repair_step_size, decode_concurrency=args.decode_concurrency,
        prompt_concurrency=args.prompt_concurrency,
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
