"""The OpenAI-compatible request bodies, checked in the HTTP thread, and the extra response fields.

Parameters, names and defaults are ``mlx_lm.server``'s (``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, penalties and their context sizes, ``xtc_*``,
``logit_bias``, ``logprobs``/``top_logprobs``, ``seed``, ``stop``, ``stream``/``stream_options``),
plus ``method``: the prefill method of this request. Tool calling is ``mlx_lm.server``'s: ``tools``
go to the chat template, history may hold ``tool`` messages and assistant messages with
``content: null`` and ``tool_calls`` (their JSON ``arguments`` decoded for the template, as mlx-lm's
``process_message_content``); ``tool_choice`` ``"none"`` renders no tools and parses no tool calls,
any other choice is ``"auto"`` (mlx-lm reads no ``tool_choice``). Every problem is a :class:`RequestError`
with an HTTP status (400, 404) and one line; nothing in a body names a file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from kvp_mlx.errors import KVPError
from kvp_mlx.generation import check_decoding
from kvp_mlx.methods import enter, get_method, missing_models, session_methods
from kvp_mlx.methods.entry import vocab_size
from kvp_mlx.model import KVPModel
from kvp_mlx.prompting import check_id_list, checked_text, context_length, render_prompt
from kvp_mlx.sampling import SamplingOptions

log = logging.getLogger("kvp_mlx.server")

MAX_TOP_LOGPROBS = 10  # as mlx-lm (it allows 0..11)
MAX_STOP_WORDS = 16
MAX_TOKENS_UNKNOWN_CONTEXT = 1 << 17
MAX_CHOICES = 16  # /v1/completions' n
MAX_PROMPTS = 64  # /v1/completions' prompts in one request


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclass
class GenerationRequest:
    """A checked request: the whole prompt as token ids and what the worker needs to serve it."""

    kind: str  # "chat" or "text"
    prompt: list[int]
    method: str
    stream: bool
    include_usage: bool
    max_tokens: int
    stop_words: list[str]
    logprobs: bool
    top_logprobs: int
    seed: int | None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingOptions fields
    # /v1/completions only: every prompt (``prompt`` is the first), its text when given as a string,
    # choices per prompt, the prompt echoed with its log-probabilities, ``logprobs`` as an integer k
    # (OpenAI's completions format with the top k; None: mlx-lm's format or none)
    prompts: list[list[int]] = field(default_factory=list)
    prompt_texts: list[str | None] = field(default_factory=list)
    n: int = 1
    echo: bool = False
    logprobs_k: int | None = None
    tools: list[dict] | None = None  # the request's tools (given to the tool-call parser)
    parse_tools: bool = True  # False: tool_choice "none", tool-call text stays in the content


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"{name} must lie in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise _bad(f"{name} must be at least {lo}, got {value}")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {value!r}")
    return value


def _check_strings(value: Any, where: str = "the request body") -> None:
    """A 400 for a string no tokenizer can take (JSON's ``"\\ud800"``: a lone surrogate), naming its field."""
    if isinstance(value, str):
        try:
            checked_text(value, where)
        except KVPError as e:
            raise _bad(str(e)) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, f"a key of {where}")
            _check_strings(item, key if where == "the request body" else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{where}[{i}]")


def _prompt_ids(model: KVPModel, prompt: Any) -> list[int]:
    """``/v1/completions``' ``prompt``: a string, or token ids (as OpenAI's API allows) in the model's vocabulary."""
    if isinstance(prompt, str) and prompt:
        return list(model.tokenizer.encode(prompt))
    if not isinstance(prompt, list) or not prompt or any(isinstance(t, (list, dict)) for t in prompt):
        raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids")
    try:
        check_id_list(prompt)
    except KVPError as e:
        raise _bad(f"prompt: {e}") from None
    return list(prompt)


def _completion_prompts(model: KVPModel, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
    """``/v1/completions``' ``prompt`` as OpenAI takes it: a string, a list of strings, a token-id
    array or a list of token-id arrays; (token ids, text when given as a string) per prompt."""
    batch = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    items = prompt if batch else [prompt]
    if len(items) > MAX_PROMPTS:
        raise _bad(f"at most {MAX_PROMPTS} prompts in one request, got {len(items)}")
    ids, texts = [], []
    for i, item in enumerate(items):
        try:
            ids.append(_prompt_ids(model, item))
        except RequestError as e:
            raise _bad(f"prompt[{i}]: {e.message}" if batch else e.message) from None
        texts.append(item if isinstance(item, str) else None)
    return ids, texts


def _completion_logprobs(body: dict) -> int | None:
    """``/v1/completions``' ``logprobs`` as an integer k (OpenAI's): None when absent or a boolean."""
    value = body.get("logprobs")
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise _bad(f"logprobs must be true, false or an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}")
    return value


def _message_text(content: Any, index: int) -> str:
    """A message's content: a string, OpenAI's list of text parts, or null (``""``, as mlx-lm)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{index}].content: only text parts are supported, got {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{index}].content must be a string, a list of text parts or null")


def _tool_calls(calls: Any, index: int) -> list[dict]:
    """An assistant message's ``tool_calls``, each function's JSON ``arguments`` decoded (the chat
    templates read them as a mapping, as mlx-lm's ``process_message_content`` gives them)."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise _bad(f"{where} must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{where}[{j}] must be an object with a 'function' holding a string 'name'")
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                raise _bad(f"{where}[{j}].function.arguments is not valid JSON: {e}") from None
        elif arguments is not None and not isinstance(arguments, dict):
            raise _bad(f"{where}[{j}].function.arguments must be a JSON string or an object")
        out.append({**call, "function": {**function, "arguments": arguments or {}}})
    return out


MESSAGE_ROLES = ("system", "user", "assistant", "developer", "tool")


def _messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise _bad(f"messages[{i}] needs a 'content' (null or omitted only beside an assistant's tool_calls)")
        message = {**m, "role": "system" if role == "developer" else role,
                   "content": _message_text(m.get("content"), i)}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise _bad(f"messages[{i}]: only an assistant message has tool_calls")
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        else:
            message.pop("tool_calls", None)
        out.append(message)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, bool]:
    """(the tools for the chat template, whether tool calls are parsed): ``tool_choice`` ``"none"``
    gives neither; ``"auto"``, ``"required"`` or a named function are taken as ``"auto"``."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _bad("tools must be a list of tool objects")
        for i, tool in enumerate(tools):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str):
                raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not (
            isinstance(choice, dict) and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        raise _bad("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                   "\"function\": {\"name\": ...}}")
    if choice == "none":
        return None, False
    return tools or None, True


def _stop_words(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise _bad("stop must be a non-empty string or a list of them")
    if len(words) > MAX_STOP_WORDS:
        raise _bad(f"at most {MAX_STOP_WORDS} stop sequences, got {len(words)}")
    return list(words)


def _sampling(body: dict, vocab_size: int | None) -> dict[str, Any]:
    """mlx-lm server's sampling and penalty parameters as :class:`SamplingOptions` fields, checked."""
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise _bad("logit_bias must be an object mapping token ids to numbers")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise _bad("logit_bias must map token ids to numbers") from None
    penalty = _number(body, "repetition_penalty", 0.0, 0)
    presence = _number(body, "presence_penalty", 0.0)
    frequency = _number(body, "frequency_penalty", 0.0)
    fields: dict[str, Any] = dict(
        temp=_number(body, "temperature", 0.0, 0), top_p=_number(body, "top_p", 0.0, 0, 1),
        min_p=_number(body, "min_p", 0.0, 0, 1), top_k=_integer(body, "top_k", 0, 0),
        xtc_probability=_number(body, "xtc_probability", 0.0, 0, 1),
        xtc_threshold=_number(body, "xtc_threshold", 0.1, 0, 1),
        repetition_penalty=penalty or None,  # 0: off, as mlx-lm's server
        repetition_context_size=_integer(body, "repetition_context_size", 20, 1),
        presence_penalty=presence or None, presence_context_size=_integer(body, "presence_context_size", 20, 1),
        frequency_penalty=frequency or None, frequency_context_size=_integer(body, "frequency_context_size", 20, 1),
        logit_bias=bias or {},
    )
    try:
        SamplingOptions(**fields).check(vocab_size)
    except KVPError as e:
        raise _bad(str(e)) from None
    return fields


def servable_methods(model: KVPModel) -> list[str]:
    """The prefill methods a server can run on ``model``: those that extend a warm cache."""
    return [name for name in session_methods() if missing_models(model, get_method(name)) is None]


def encode_chat(model: KVPModel, messages: list[dict[str, Any]], template_config: dict | None,
                tools: list[dict] | None = None) -> list[int]:
    """The whole conversation's token ids: the chat template (as ``mlx_lm.generate``), or mlx-lm
    server's plain rendering for a tokenizer without one. ``tools`` go to the template; a
    tokenizer without tool calling gets them too, with a warning, as in ``mlx_lm.server``."""
    tokenizer = model.tokenizer
    if getattr(tokenizer, "has_chat_template", False):
        if tools and not getattr(tokenizer, "has_tool_calling", False):
            log.warning("received tools but this model's tokenizer has no tool-call markers: "
                        "tool calls in its output are not parsed")
        try:
            return render_prompt(tokenizer, messages, chat_template_config=template_config, tools=tools)
        except KVPError as e:
            raise _bad(str(e)) from None
    from mlx_lm.server import convert_chat

    return list(tokenizer.encode(convert_chat(messages)))


def parse_request(body: Any, kind: str, model: KVPModel, model_id: str, default_method: str,
                  default_max_tokens: int, prefill_step_size: int) -> GenerationRequest:
    """Check a decoded JSON body of ``/v1/chat/completions`` (``kind="chat"``) or
    ``/v1/completions`` (``"text"``) and tokenize its prompt."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    _check_strings(body)
    requested = body.get("model")
    if requested is not None and requested not in (model_id, "default_model"):
        if not isinstance(requested, str):
            raise _bad("model must be a string")
        raise RequestError(404, f"model {requested[:200]!r} is not served here (this server serves {model_id!r})",
                           "not_found_error")
    n = _integer(body, "n", 1, 1)
    assert n is not None
    if n != 1 and kind == "chat":
        raise _bad("n must be 1 (one choice per request)")
    if n > MAX_CHOICES:
        raise _bad(f"n must be at most {MAX_CHOICES}, got {n}")
    echo = kind == "text" and _flag(body, "echo")
    logprobs_k = _completion_logprobs(body) if kind == "text" else None
    method = body.get("method", default_method)
    if not isinstance(method, str):
        raise _bad(f"method must be a string, one of {', '.join(servable_methods(model))} for this model")
    try:
        enter(model, method, warm=True)  # the method exists, this model can run it, it extends a warm cache
    except KVPError as e:
        raise _bad(str(e)) from None
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object")
    include_usage = bool(options and _flag(options, "include_usage"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    least = 0 if echo else 1  # max_tokens 0 with echo: the prompt's log-probabilities only (lm-eval)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < least):
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}")
    logprobs = logprobs_k is not None or _flag(body, "logprobs")
    top = body.get("top_logprobs")
    top_logprobs = 0 if top is None or top == -1 else top  # -1: mlx-lm's "none"
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**64:
        raise _bad("seed must lie in [0, 2**64)")
    template_config = body.get("chat_template_kwargs")
    if template_config is not None and not isinstance(template_config, dict):
        raise _bad("chat_template_kwargs must be an object")
    stop_words = _stop_words(body)
    vocab = vocab_size(model)
    sampling = _sampling(body, vocab)
    tools, parse_tools = _tools(body) if kind == "chat" else (None, False)
    if kind == "chat":
        prompts, texts = [encode_chat(model, _messages(body), template_config, tools)], [None]  # type: list[list[int]], list[str | None]
    else:
        prompts, texts = _completion_prompts(model, body.get("prompt"))
    limit = context_length(model.base_config)
    for prompt in prompts:
        if not prompt:
            raise _bad("the prompt is empty")
        if vocab is not None and max(prompt) >= vocab:
            raise _bad(f"token id {max(prompt)} is outside this model's vocabulary: token ids must lie in "
                       f"[0, {vocab})")
        if limit is not None and len(prompt) >= limit[0] + (max_tokens == 0):  # echo alone: the whole context
            raise _bad(f"the prompt has {len(prompt)} tokens, which leaves no room in the model's context of "
                       f"{limit[0]}")
    prompt = max(prompts, key=len)  # the longest bounds max_tokens
    if max_tokens is None:  # the server's default, cut to what is left of the context
        max_tokens = default_max_tokens if limit is None else min(default_max_tokens, limit[0] - len(prompt))
    if limit is None and max_tokens > MAX_TOKENS_UNKNOWN_CONTEXT:
        raise _bad(f"max_tokens must be at most {MAX_TOKENS_UNKNOWN_CONTEXT} (the model's context is not known)")
    if limit is not None and len(prompt) + max_tokens > limit[0]:
        raise _bad(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                   f"context of {limit[0]} tokens (at most {limit[0] - len(prompt)} fit)")
    try:
        check_decoding(max(max_tokens, 1), prefill_step_size, None, None, 64, 0, 1)
    except KVPError as e:
        raise _bad(str(e)) from None
    return GenerationRequest(kind, prompts[0], method, stream, include_usage, max_tokens, stop_words, logprobs,
                             top_logprobs, seed, sampling, prompts, texts, n, echo, logprobs_k, tools=tools,
                             parse_tools=parse_tools)
