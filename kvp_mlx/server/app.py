"""The HTTP side: the standard library's threading server, as ``mlx_lm.server`` uses, and mlx-lm's
own handler for the response shapes (``generate_response``, ``completion_usage_response``, headers).

Endpoints: ``POST /v1/chat/completions`` (also ``/chat/completions``), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``. The HTTP threads parse and check a request
(:mod:`kvp_mlx.server.protocol`), hand it to the worker and stream what it produces; they run no
MLX. A bad request gets a 4xx with a JSON body ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

from mlx_lm.server import APIHandler, ToolCallFormatter, get_system_fingerprint

from kvp_mlx.model import KVPModel
from kvp_mlx.server.prompt_cache import SessionCache
from kvp_mlx.server.protocol import RequestError, parse_request
from kvp_mlx.server.worker import Job, Worker

log = logging.getLogger("kvp_mlx.server")

MAX_BODY_BYTES = 8 << 20
KEEPALIVE_S = 2.0  # a comment line this often while a streamed request waits for its first token
POLL_S = 0.25  # how often a waiting handler checks whether its client is still there


@dataclass
class ServerConfig:
    model_id: str
    method: str
    max_tokens: int = 512
    prompt_cache_size: int = 10
    prompt_cache_bytes: int = 1 << 63
    repair: bool = True
    api_key: str | None = None
    prefill_step_size: int = 2048
    repair_step_size: int = 256
    decode_concurrency: int = 32  # > 1: continuous batching (kvp_mlx.server.batching), as mlx_lm.server
    prompt_concurrency: int = 8


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 128  # listen backlog (the standard 5 turns away clients that connect at once)


class _ClientGone(Exception):
    pass


def worker_error(status: int, message: str) -> RequestError:
    """The worker's error event as an API error (5xx: the server's fault, else the request's)."""
    return RequestError(status, message, "server_error" if status >= 500 else "invalid_request_error")


class Handler(APIHandler):
    """One HTTP request (the connection closes after it, as mlx-lm's server)."""

    timeout = 60  # seconds a client may stall a read or a write
    server: "KVPServer"  # type: ignore[assignment]

    def __init__(self, app: "KVPServer", *args: Any) -> None:
        self.app = app
        # mlx-lm's handler reads CORS origins from its generator's cli_args
        context = SimpleNamespace(cli_args=SimpleNamespace(allowed_origins=["*"]))
        super().__init__(context, *args, system_fingerprint=app.fingerprint)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (BaseHTTPRequestHandler's name)
        log.info("%s - %s", self.address_string(), format % args)

    # --- helpers -------------------------------------------------------------------------------

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, error: RequestError) -> None:
        self._json(error.status, error.body())

    def _authorized(self) -> bool:
        key = self.app.config.api_key
        if key is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            self._error(RequestError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                     "authentication_error"))
            return False
        return True

    def _client_gone(self) -> bool:
        """True when the client closed its side (nothing more is expected from it after the body)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (OSError, ValueError) as e:
            raise _ClientGone() from e

    def _event(self, job: Job, keepalive: bool) -> tuple:
        """The worker's next event for ``job``; raises :class:`_ClientGone` if the client left."""
        last = time.monotonic()
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if not self.app.worker.alive:
                return ("error", 503, "the model worker stopped")
            if self._client_gone():
                raise _ClientGone()
            if keepalive and time.monotonic() - last >= KEEPALIVE_S:
                self._send(b": keepalive\n\n")
                last = time.monotonic()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (a bad request line, an unsupported method) as JSON bodies."""
        self.close_connection = True
        data = json.dumps(RequestError(code, message or HTTPStatus(code).phrase).body()).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def _not_allowed(self) -> None:
        self.close_connection = True
        data = json.dumps(RequestError(405, f"method {self.command} is not allowed: the API takes GET and POST",
                                       "invalid_request_error").body()).encode()
        self.send_response(405)
        self.send_header("Allow", "GET, POST, OPTIONS")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    # --- GET -----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            ok = self.app.worker.alive
            # "idle": nothing queued, running or left to repair (benchmarks wait for it)
            self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable",
                                            "idle": self.app.worker.idle.is_set()})
            return
        if not self._authorized():
            return
        model = {"id": self.app.config.model_id, "object": "model", "created": self.app.created,
                 "owned_by": "kvp-mlx"}
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{self.app.config.model_id}":
            self._json(200, model)
        elif path.startswith("/v1/models/"):
            self._error(RequestError(404, "no such model", "not_found_error"))
        else:
            self._error(RequestError(404, f"no such endpoint: GET {path[:100]}", "not_found_error"))

    # --- POST ----------------------------------------------------------------------------------

    def do_POST(self) -> None:
        kinds = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text"}
        kind = kinds.get(self.path.split("?", 1)[0])
        if kind is None:
            self._error(RequestError(404, f"no such endpoint: POST {self.path[:100]}", "not_found_error"))
            return
        if not self._authorized():
            return
        try:
            body = self._read_body()
            config = self.app.config
            request = parse_request(body, kind, self.app.model, config.model_id, config.method, config.max_tokens,
                                    config.prefill_step_size)
        except RequestError as e:
            self._error(e)
            return
        self.stream = request.stream
        self.requested_model = body.get("model") or config.model_id  # the name asked for, as mlx_lm.server
        self.request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4()}"
        if kind == "chat":
            self.object_type = "chat.completion.chunk" if self.stream else "chat.completion"
        else:
            self.object_type = "text_completion"
        job = self.app.worker.submit(request)
        try:
            if kind == "text":
                self._respond_text(job)
            else:
                self._respond(job)
        except _ClientGone:
            job.cancelled.set()
        finally:
            job.cancelled.set()  # done either way: a worker still on it stops at the next token

    def _read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if size < 0:
            raise RequestError(400, "invalid Content-Length header")
        if size > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(size)
        if len(raw) != size:
            raise RequestError(400, "the request body is shorter than its Content-Length")
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the request body is not valid UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"invalid JSON in the request body: {str(e)[:200]}") from None

    def _respond(self, job: Job) -> None:
        event = self._event(job, keepalive=False)  # waiting in the queue: nothing sent yet
        if event[0] == "error":
            self._error(worker_error(event[1], event[2]))
            return
        assert event[0] == "start"
        if self.stream:
            self._set_stream_headers(200)
            self.end_headers()
            self._send(b"")
        text, tokens, logprobs, tops = [], [], [], []
        # mlx_lm.server's parsing of tool-call texts with the tokenizer's parser (chat only)
        self.tool_formatter = ToolCallFormatter(self.app.model.tokenizer.tool_parser, job.request.tools, self.stream)
        self.tool_calls: list[dict] = []
        reasoning: list[str] = []
        while True:
            event = self._event(job, keepalive=self.stream)
            kind = event[0]
            if kind == "token":
                piece = event[1]
                tokens.append(piece["token"])
                if "logprob" in piece:
                    logprobs.append(piece["logprob"])
                    tops.append(piece["top"])
                calls = self.tool_formatter(piece.get("tool_calls", []))
                self.tool_calls += calls
                # a chunk per token with text, a tool call or reasoning, and per token when logprobs are asked
                if self.stream and (piece["text"] or calls or piece.get("reasoning") or "logprob" in piece):
                    chunk = self.generate_response(
                        piece["text"], None, token_logprobs=[piece["logprob"]] if "logprob" in piece else None,
                        top_tokens=[piece["top"]] if piece.get("top") else None, tokens=[piece["token"]],
                        tool_calls=calls, reasoning_text=piece.get("reasoning"))
                    self._send(f"data: {json.dumps(chunk)}\n\n".encode())
                elif not self.stream:
                    text.append(piece["text"])
                    reasoning.append(piece.get("reasoning", ""))
            elif kind == "error":
                self._error_event(event[1], event[2])
                return
            else:
                assert kind == "done"
                self._finish(job, event[1], "".join(text), tokens, logprobs, tops, "".join(reasoning))
                return

    def _finish(self, job: Job, summary: dict, text: str, tokens: list[int], logprobs: list[float],
                tops: list, reasoning: str = "") -> None:
        usage_extra = {"prefill": summary["prefill"]}
        finish_reason = summary["finish_reason"]
        if finish_reason == "stop" and self.tool_calls:  # as mlx_lm.server
            finish_reason = "tool_calls"
        if self.stream:
            chunk = self.generate_response("", finish_reason)
            self._send(f"data: {json.dumps(chunk)}\n\n".encode())
            if job.request.include_usage:
                usage = self.completion_usage_response(summary["prompt_tokens"], summary["completion_tokens"],
                                                       summary["cached_tokens"])
                usage["object"] = self.object_type
                usage["usage"].update(usage_extra)
                self._send(f"data: {json.dumps(usage)}\n\n".encode())
            self._send(b"data: [DONE]\n\n")
            return
        response = self.generate_response(
            text, finish_reason, summary["prompt_tokens"], summary["completion_tokens"],
            summary["cached_tokens"], token_logprobs=logprobs, top_tokens=[t for t in tops if t] or None,
            tokens=tokens, tool_calls=self.tool_calls, reasoning_text=reasoning)  # type: ignore[arg-type]  # mlx-lm passes these dicts
        message = response["choices"][0].get("message")
        if message is not None and message["content"] is None and not self.tool_calls:
            message["content"] = ""  # an empty reply is "" (mlx-lm: null); null only beside tool calls
        response["usage"].update(usage_extra)
        data = json.dumps(response).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._send(data)


    # --- /v1/completions -------------------------------------------------------------------------

    def _envelope(self, choices: list[dict]) -> dict:
        return {"id": self.request_id, "system_fingerprint": self.system_fingerprint, "object": self.object_type,
                "model": self.requested_model, "created": self.created, "choices": choices}

    def _send_chunk(self, choices: list[dict]) -> None:
        self._send(f"data: {json.dumps(self._envelope(choices))}\n\n".encode())

    def _respond_text(self, job: Job) -> None:
        """``/v1/completions``: choices ``prompt * n + i``; ``logprobs`` as an integer answers in
        OpenAI's completions format (``tokens``, ``token_logprobs``, ``top_logprobs``,
        ``text_offset``), with the echoed prompt's tokens first; ``logprobs: true`` in mlx-lm's."""
        req = job.request
        event = self._event(job, keepalive=False)  # waiting in the queue: nothing sent yet
        if event[0] == "error":
            self._error(worker_error(event[1], event[2]))
            return
        assert event[0] == "start"
        # the log-probabilities' format: OpenAI's completions (logprobs: k), mlx-lm's (true), none
        self.logprobs_style = ("openai" if req.logprobs_k is not None else
                               "mlx" if req.logprobs or req.top_logprobs else None)
        if self.stream:
            self._set_stream_headers(200)
            self.end_headers()
            self._send(b"")
        count = len(req.prompts or [req.prompt]) * req.n
        choices = [_TextChoice() for _ in range(count)]
        while True:
            event = self._event(job, keepalive=self.stream)
            kind = event[0]
            if kind == "echo":
                echo = event[1]
                for i in range(echo["prompt"] * req.n, (echo["prompt"] + 1) * req.n):
                    piece = choices[i].add_echo(echo, req.logprobs_k is not None)
                    if self.stream:
                        self._send_chunk([self._text_choice(i, piece, None)])
            elif kind == "token":
                piece = event[1]
                choice = choices[piece.get("index", 0)]
                out = choice.add_token(piece)
                if self.stream and (piece["text"] or "logprob" in piece):  # logprobs: every token
                    self._send_chunk([self._text_choice(piece.get("index", 0), out, None)])
            elif kind == "choice":
                end = event[1]
                choices[end["index"]].finish_reason = end["finish_reason"]
                if self.stream:
                    self._send_chunk([{"index": end["index"], "text": "", "logprobs": None,
                                       "finish_reason": end["finish_reason"]}])
            elif kind == "error":
                self._error_event(event[1], event[2])
                return
            else:
                assert kind == "done"
                self._finish_text(job, event[1], choices)
                return

    def _error_event(self, status: int, message: str) -> None:
        """The worker's error for this request: an SSE error event (then [DONE]) or a JSON error."""
        if self.stream:
            self._send(f"data: {json.dumps(RequestError(status, message, 'server_error').body())}\n\n".encode())
            self._send(b"data: [DONE]\n\n")
        else:
            self._error(worker_error(status, message))

    def _text_choice(self, index: int, choice: "_TextChoice", finish_reason: str | None) -> dict:
        return {"index": index, "text": "".join(choice.text), "logprobs": choice.logprobs(self.logprobs_style),
                "finish_reason": finish_reason}

    def _finish_text(self, job: Job, summary: dict, choices: list["_TextChoice"]) -> None:
        usage = {"prompt_tokens": summary["prompt_tokens"], "completion_tokens": summary["completion_tokens"],
                 "total_tokens": summary["prompt_tokens"] + summary["completion_tokens"],
                 "prompt_tokens_details": {"cached_tokens": summary["cached_tokens"]}, "prefill": summary["prefill"]}
        if self.stream:
            if job.request.include_usage:
                self._send(f"data: {json.dumps(dict(self._envelope([]), usage=usage))}\n\n".encode())
            self._send(b"data: [DONE]\n\n")
            return
        response = self._envelope([self._text_choice(i, c, c.finish_reason) for i, c in enumerate(choices)])
        response["usage"] = usage
        data = json.dumps(response).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._send(data)


class _TextChoice:
    """One completions choice as it grows: its text and its tokens' log-probabilities (a streamed
    piece is a _TextChoice of that piece alone)."""

    def __init__(self, offset: int = 0) -> None:
        self.text: list[str] = []
        self.length = offset  # characters so far (text_offset of the next token)
        self.ids: list[int] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[Any] = []  # OpenAI: {text: logprob} or None; mlx-lm: its top entries
        self.offsets: list[int] = []
        self.finish_reason: str | None = None

    def add_echo(self, echo: dict, openai: bool) -> "_TextChoice":
        piece = _TextChoice(self.length)
        piece.text = [echo["text"]]
        if openai:
            piece.ids, piece.tokens, piece.token_logprobs = list(echo["token_ids"]), list(echo["tokens"]), \
                list(echo["logprobs"])
            piece.top = list(echo["top"])
            piece.offsets = [self.length + o for o in echo["offsets"]]
        self._extend(piece)
        return piece

    def add_token(self, event: dict) -> "_TextChoice":
        piece = _TextChoice(self.length)
        piece.text = [event["text"]]
        if "logprob" in event:
            piece.ids, piece.token_logprobs = [event["token"]], [event["logprob"]]
            piece.tokens = [event.get("token_text", "")]
            piece.top = [event["top_map"] if "top_map" in event else event.get("top")]
            piece.offsets = [self.length]
        self._extend(piece)
        return piece

    def _extend(self, piece: "_TextChoice") -> None:
        self.text += piece.text
        self.length += sum(len(t) for t in piece.text)
        self.ids += piece.ids
        self.tokens += piece.tokens
        self.token_logprobs += piece.token_logprobs
        self.top += piece.top
        self.offsets += piece.offsets

    def logprobs(self, style: str | None) -> dict | None:
        if style == "openai":
            return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                    "text_offset": self.offsets}
        if style == "mlx":  # as mlx_lm.server's generate_response
            if any(self.top):
                return {"content": [dict(t[0], top_logprobs=t) if t else {} for t in self.top]}
            return {"content": [dict(id=i, logprob=g) for i, g in zip(self.ids, self.token_logprobs)]}
        return None


class KVPServer:
    """A model, its worker and an HTTP server on ``host:port`` (port 0: a free one)."""

    def __init__(self, model: KVPModel, config: ServerConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.model, self.config = model, config
        self.created = int(time.time())
        self.fingerprint = get_system_fingerprint()
        cache = SessionCache(config.prompt_cache_size, config.prompt_cache_bytes)
        self.worker = Worker(model, cache, repair=config.repair, prefill_step_size=config.prefill_step_size,
                             repair_step_size=config.repair_step_size,
                             decode_concurrency=config.decode_concurrency,
                             prompt_concurrency=config.prompt_concurrency)
        self.httpd = _HTTPServer((host, port), lambda *a: Handler(self, *a))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> "KVPServer":
        """Serve in background threads (tests, embedding)."""
        self.worker.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvp-mlx-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()
            self.worker.stop()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.worker.stop()
        if self._thread is not None:
            self._thread.join(10)
