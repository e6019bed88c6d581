"""`kvp-mlx serve` side by side with `mlx_lm.server` on the same base directory, over HTTP with the
`openai` client: a concurrent load (clients x requests, mixed streaming, prompts sharing a long
prefix) and a multi-turn chat (the whole history sent each turn), per-turn TTFT.

    python -m bench.serve_load [--model DIR] [--out bench/results/serve]

Both servers are subprocesses on loopback. Each load runs while the other server is idle; the chat
turns are interleaved (turn k on one server, then on the other), each sent only once the kvp server
reports itself idle (its idle repair done), so the two never share the CPU. mlx_lm.server runs with
the same optimized BLAS as kvp-mlx (it is started after ``import kvp_mlx``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

SHARED = ("You are a meticulous code reviewer. For every snippet you are shown, explain what it does, "
          "point out bugs, and suggest a cleaner version. Keep answers short. ") * 6
QUESTIONS = ["def add(a, b): return a - b", "for i in range(10): print(i)", "x = [i * i for i in range(5)]",
             "import os; os.remove(path)", "while True: pass", "def f(n): return f(n - 1)",
             "print(sum(range(100)))", "s = 'abc'[::-1]"]
TURNS = ["Here is my module:\n" + "def parse(line):\n    return line.split(',')\n" * 12 + "Review it.",
         "Now add type hints.", "Explain the change in two sentences.", "Write a test for parse."]


def start(cmd: list[str], pattern: str, env: dict) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore
            return proc, int(m.group(1))
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def wait_ready(port: int, kvp: bool) -> None:
    for _ in range(3000):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                body = json.loads(r.read())
                if body.get("status") == "ok" and (not kvp or body.get("idle", True)):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def ask(client, model: str, prompt: str, stream: bool, max_tokens: int) -> tuple[float, float, str]:
    tic = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    if stream:
        ttft, text = None, []
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - tic
                text.append(chunk.choices[0].delta.content)
        total = time.perf_counter() - tic
        return ttft or total, total, "".join(text)
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    total = time.perf_counter() - tic
    return total, total, r.choices[0].message.content or ""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    results, errors = [], []

    def run(i: int) -> None:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        for j in range(requests):
            prompt = SHARED + QUESTIONS[(i + j) % len(QUESTIONS)]
            try:
                results.append(ask(c, model, prompt, stream=(i + j) % 2 == 0, max_tokens=max_tokens))
            except Exception as e:
                errors.append(repr(e))

    tic = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    ttft, total = [r[0] for r in results], [r[1] for r in results]
    return {"answered": len(results), "lost": clients * requests - len(results), "errors": errors[:3],
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": pct(ttft, 0.95),
            "total_p50_s": statistics.median(total), "total_p95_s": pct(total, 0.95), "wall_s": wall}


def chat_turns(ports: dict[str, int], models: dict[str, str], max_tokens: int, repeats: int) -> dict:
    import openai

    clients = {k: openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="x", max_retries=0, timeout=600)
               for k, p in ports.items()}
    ttfts: dict[str, list[list[float]]] = {k: [[] for _ in TURNS] for k in ports}
    cached: dict[str, list[int]] = {k: [0] * len(TURNS) for k in ports}
    for rep in range(repeats):
        history: dict[str, list] = {k: [{"role": "system", "content": f"Session {rep}. " + SHARED}] for k in ports}
        for turn, message in enumerate(TURNS):
            for name in ports:  # interleaved: this turn on each server in turn
                wait_ready(ports["kvp-mlx serve"], kvp=True)
                history[name].append({"role": "user", "content": message})
                tic, ttft, text, usage = time.perf_counter(), None, [], None
                for chunk in clients[name].chat.completions.create(
                        model=models[name], messages=history[name], max_tokens=max_tokens, temperature=0,
                        stream=True, stream_options={"include_usage": True}):
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.choices and chunk.choices[0].delta.content:
                        ttft = ttft or time.perf_counter() - tic
                        text.append(chunk.choices[0].delta.content)
                ttfts[name][turn].append(ttft or time.perf_counter() - tic)
                details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
                cached[name][turn] = getattr(details, "cached_tokens", 0) or 0
                history[name].append({"role": "assistant", "content": "".join(text)})
    return {k: {"ttft_median_s": [statistics.median(t) for t in v], "cached_tokens": cached[k]}
            for k, v in ttfts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="KV Prediction directory (default: the embedded demo)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--chat-repeats", type=int, default=3)
    parser.add_argument("--decode-concurrency", type=int, default=32,
                        help="kvp-mlx serve's --decode-concurrency (default 32, both servers' default; 1 serves one "
                        "request at a time)")
    parser.add_argument("--prompt-concurrency", type=int, default=8,
                        help="kvp-mlx serve's --prompt-concurrency (default 8, both servers' default)")
    parser.add_argument("--skip-chat", action="store_true", help="the concurrent load only")
    parser.add_argument("--out", default="bench/results/serve")
    args = parser.parse_args(argv)
    for flag in ("clients", "requests", "max_tokens", "decode_concurrency", "prompt_concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    from kvp_mlx.model import DEFAULT_MODEL_DIR

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    model_dir = without_context_limit(model_dir)
    base_dir = float32_copy(model_dir / "base")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    bin_dir = Path(sys.executable).parent
    ours, our_port = start([str(bin_dir / "kvp-mlx"), "serve", "--model", str(model_dir), "--port", "0",
                            "--decode-concurrency", str(args.decode_concurrency),
                            "--prompt-concurrency", str(args.prompt_concurrency)],
                           r"on http://127\.0\.0\.1:(\d+)", env)
    # mlx_lm.server with the same optimized BLAS kvp_mlx loads (import kvp_mlx before mlx.core)
    launch = "import sys, kvp_mlx; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
    theirs, their_port = start([sys.executable, "-c", launch, "--model", str(base_dir), "--port",
                                str(_free_port()), "--log-level", "INFO"], r"port (\d+)", env)
    ports = {"kvp-mlx serve": our_port, "mlx_lm.server": their_port}
    models = {"kvp-mlx serve": str(model_dir), "mlx_lm.server": str(base_dir)}
    try:
        for name in ports:
            wait_ready(ports[name], kvp=name == "kvp-mlx serve")
        report: dict = {"model": str(model_dir), "machine": platform.platform(), "clients": args.clients,
                        "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                        "decode_concurrency": args.decode_concurrency,
                        "prompt_concurrency": args.prompt_concurrency, "load": {}}
        for name in ports:
            wait_ready(our_port, kvp=True)
            report["load"][name] = load(ports[name], models[name], args.clients, args.requests, args.max_tokens)
            print(name, json.dumps(report["load"][name]), flush=True)
        wait_ready(our_port, kvp=True)
        if not args.skip_chat:
            report["chat"] = chat_turns(ports, models, args.max_tokens, args.chat_repeats)
            print(json.dumps(report["chat"]), flush=True)
        for name in ports:  # healthy after
            wait_ready(ports[name], kvp=False)
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait(30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    (out / "serve_load.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def without_context_limit(model_dir: Path) -> Path:
    """A copy of the KV Prediction directory whose configs drop their context length: the demo model
    declares the 256 tokens it was trained on, and kvp-mlx serve (unlike mlx_lm.server) refuses longer
    prompts; the chat turns here grow past that, and this benchmark times, it does not judge text."""
    import json
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="serve-bench-model-")) / model_dir.name
    shutil.copytree(model_dir, out)
    for config in out.glob("*/config.json"):
        data = json.loads(config.read_text())
        data.pop("max_context_length", None)  # openelm's (mlx-lm ignores it; others' keys are model args)
        config.write_text(json.dumps(data, indent=2))
    return out


def float32_copy(base: Path) -> Path:
    """The base directory with float32 weights: kvp-mlx computes in float32 on the CPU (its default),
    mlx_lm.server in the checkpoint's dtype; the same weights in float32 make them compare fairly."""
    import shutil
    import tempfile

    import mlx.core as mx

    out = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "base"
    shutil.copytree(base, out)
    for path in out.glob("*.safetensors"):
        weights = mx.load(str(path))
        assert isinstance(weights, dict)
        mx.save_safetensors(str(path), {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                                        for k, v in weights.items()}, metadata={"format": "mlx"})
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def markdown(report: dict) -> str:
    lines = [f"Model: `{report['model']}`; {report['clients']} clients x {report['requests_per_client']} requests, "
             f"max_tokens {report['max_tokens']}, prompts sharing a {len(SHARED)}-character prefix; "
             f"kvp-mlx serve --decode-concurrency {report.get('decode_concurrency', 1)} "
             f"--prompt-concurrency {report.get('prompt_concurrency', 1)}; "
             f"{report['machine']}", "",
             "| server | answered | lost | TTFT p50 (s) | TTFT p95 (s) | total p50 (s) | total p95 (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["load"].items():
        lines.append(f"| {name} | {r['answered']} | {r['lost']} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | "
                     f"{r['total_p50_s']:.3f} | {r['total_p95_s']:.3f} | {r['wall_s']:.1f} |")
    if "chat" not in report:
        return "\n".join(lines) + "\n"
    lines += ["", "Multi-turn chat (whole history each turn), median TTFT per turn (s) and cached tokens:", "",
              "| turn | " + " | ".join(report["chat"]) + " |", "|---|" + "---|" * len(report["chat"])]
    for turn in range(len(TURNS)):
        cells = [f"{r['ttft_median_s'][turn]:.3f} ({r['cached_tokens'][turn]} cached)" for r in report["chat"].values()]
        lines.append(f"| {turn + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
