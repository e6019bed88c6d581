"""From what the user typed to token ids, as mlx-lm does it: text checked for UTF-8, the tokenizer's
chat template applied by default, and the prompt checked against the model's context length.

``mlx_lm.generate`` renders ``[system?, user]`` with ``apply_chat_template(..., tokenize=False,
add_generation_prompt=True)`` and encodes the result without special tokens; a raw prompt (no
template, or ``--ignore-chat-template``) is encoded with them. These functions do exactly that
through the tokenizer's own template, so the token ids match mlx-lm's for the same input.
"""

from __future__ import annotations

import sys
from numbers import Integral
from typing import Any, Sequence

import mlx.core as mx

from kvp_mlx.errors import KVPError

Message = dict[str, Any]  # "role" and "content" strings, and what a chat template reads besides (tool_calls)
Prompt = str | Sequence[Message] | Sequence[int] | mx.array

# Config keys holding a model's context length, in the order they are trusted.
CONTEXT_KEYS = ("max_position_embeddings", "max_context_length", "max_sequence_length", "n_positions",
                "seq_length", "max_seq_len")


def decode_utf8(data: bytes, source: str = "the prompt") -> str:
    """``data`` as text; bytes that are not UTF-8 are a one-line error naming the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KVPError(
            f"{source} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason})"
        ) from None


def checked_text(text: str, source: str = "the prompt") -> str:
    """Text a tokenizer can take: undecodable command-line bytes (surrogate escapes) and lone
    surrogates (``"\\ud800"`` in JSON or Python) are one-line errors."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise KVPError(f"{source} is not valid Unicode text: a lone surrogate U+{ord(text[e.start]):04X} at "
                           f"character {e.start}") from None
        decode_utf8(data, source)
    return text


def read_prompt_arg(text: str) -> str:
    """``--prompt``: ``-`` reads standard input (as bytes, checked for UTF-8); otherwise the text,
    with literal ``\\n`` and ``\\t`` unescaped as ``mlx_lm.generate`` does."""
    if text == "-":
        return decode_utf8(sys.stdin.buffer.read(), "standard input")
    return checked_text(text, "--prompt").replace("\\n", "\n").replace("\\t", "\t")


def chat_messages(prompt: str, system_prompt: str | None = None,
                  prefill_response: str | None = None) -> list[Message]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    if prefill_response is not None:
        messages.append({"role": "assistant", "content": prefill_response})
    return messages


def render_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    system_prompt: str | None = None,
    use_chat_template: bool | None = None,
    chat_template_config: dict | None = None,
    prefill_response: str | None = None,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids for a prompt: text, chat messages (``[{"role": ..., "content": ...}, ...]``) or ids.

    ``tools`` (OpenAI's function definitions) go to the chat template as ``mlx_lm.server`` passes
    them (``apply_chat_template(..., tools=tools)``); messages may carry the template's other keys
    (an assistant's ``tool_calls``, a tool result's ``tool_call_id``) besides a string ``content``.

    Text goes through the tokenizer's chat template when it has one (``use_chat_template=None``)
    or when asked (``True``: an error without a template); ``False`` encodes it raw, with the
    tokenizer's special tokens (BOS), as ``mlx_lm.generate --ignore-chat-template`` does.
    """
    if isinstance(prompt, mx.array) or (
        isinstance(prompt, (list, tuple)) and prompt and not all(isinstance(m, dict) for m in prompt)
    ):
        return token_ids(prompt)
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if isinstance(prompt, str):
        if prompt == "":
            raise KVPError("empty prompt")
        checked_text(prompt)
        templated = has_template if use_chat_template is None else use_chat_template
        if not templated:
            if system_prompt is not None or prefill_response is not None:
                raise KVPError("a system prompt or a prefilled response needs the chat template "
                               "(this tokenizer has none, or --ignore-chat-template was given)")
            return list(tokenizer.encode(prompt, add_special_tokens=True))
        messages = chat_messages(prompt, system_prompt, prefill_response)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if use_chat_template is False:
            raise KVPError("chat messages need the chat template (got use_chat_template=False)")
        messages = [dict(m) for m in prompt]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        bad = [m for m in messages if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)]
        if bad:
            raise KVPError(f"each chat message needs a string 'role' and 'content', got {bad[0]!r}")
    else:
        raise KVPError(f"a prompt is text, a list of chat messages or a list of token ids, got {type(prompt).__name__}")
    for i, m in enumerate(messages):
        checked_text(m["content"], f"the content of message {i}")
    if not has_template:
        raise KVPError("this model's tokenizer has no chat template (pass plain text, or give the model a "
                       "chat_template in tokenizer_config.json)")
    # a final assistant message is continued (a prefilled reply), unless it is a finished tool call
    continue_final = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    add_generation_prompt = add_generation_prompt and not continue_final
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, continue_final_message=continue_final,
            add_generation_prompt=add_generation_prompt, **extra, **(chat_template_config or {}),
        )
    except Exception as e:  # jinja and transformers raise many types for a template that does not fit
        raise KVPError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_id_list(ids: Any, nested: bool = False) -> None:
    """A one-line error for a list of token ids holding anything but integers (bools, floats,
    strings; with ``nested``, one level of lists is a batch) or a negative id."""
    for i, t in enumerate(ids):
        if nested and isinstance(t, (list, tuple)):
            check_id_list(t)
        elif isinstance(t, bool) or not isinstance(t, Integral):
            raise KVPError(f"token ids must be integers, got {t!r} ({type(t).__name__}) at position {i}")
        elif int(t) < 0:
            raise KVPError(f"token id {t} at position {i} is negative")
        elif int(t) >= 2**31:
            raise KVPError(f"token id {t} at position {i} is too large to be a token id")


def token_ids(prompt: Sequence[Any] | mx.array) -> list[int]:
    """A prompt given as token ids (a list, or a 1-D or [1, T] mx.array): integers and not
    negative, or a one-line error. The model's vocabulary is checked where the model is known
    (:meth:`kvp_mlx.methods.MethodCall.check_ids`)."""
    if isinstance(prompt, mx.array):
        if prompt.ndim > 2 or (prompt.ndim == 2 and prompt.shape[0] != 1):
            raise KVPError(f"a prompt of token ids is one sequence [T], got shape {tuple(prompt.shape)}")
        if prompt.size and not mx.issubdtype(prompt.dtype, mx.integer):
            raise KVPError(f"token ids must be integers, got an array of {str(prompt.dtype).rsplit('.', 1)[-1]}")
        prompt = prompt.reshape(-1).tolist()  # type: ignore[assignment]  # a list of ints
    check_id_list(prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise KVPError("empty prompt")
    return ids


def context_length(config: dict) -> tuple[int, str] | None:
    """The model's context length and the config key that says so, if the config has one."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_context(n_tokens: int, config: dict, strict: bool = False) -> str | None:
    """A warning when ``n_tokens`` exceed the model's context (returned), or an error when ``strict``."""
    found = context_length(config)
    if found is None or n_tokens <= found[0]:
        return None
    limit, key = found
    text = (f"the prompt has {n_tokens} tokens, more than the model's context of {limit} ({key}); "
            "expect degraded output")
    if strict:
        raise KVPError(text.replace("; expect degraded output", " (--strict-context)"))
    return text
