"""OpenAI request bodies -> validated engine requests.

OpenAI's own rule is followed for unknown arguments: they are rejected with 400 (never
silently ignored).  Arguments that would change the meaning of a request and that we do
not implement (tools, logprobs, n > 1, response_format other than text, ...) are rejected
too; a few that change nothing here (``user``, ``metadata``, ``store``, ...) are accepted.
See README "API" for the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..dispatch.request import Limits, Request
from ..engines.base import TextRequest
from ..errors import InvalidRequest

__all__ = [
    "int_param",
    "Call",
    "parse_json",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "Limits",
]


@dataclass(frozen=True)
class Call:
    """A parsed OpenAI request: the dispatch ``Request`` and what only the HTTP answer
    needs (the usage chunk, the embeddings' encoding)."""

    request: Request
    include_usage: bool = False
    base64: bool = False

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def stream(self) -> bool:
        return self.request.stream


IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier"}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs",
               "logit_bias", "best_of", "echo", "suffix", "audio", "modalities", "prediction",
               "reasoning_effort", "web_search_options", "verbosity"}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
             "presence_penalty", "frequency_penalty", "stream", "stream_options"}
CHAT_KEYS = _SAMPLING | {"messages", "max_completion_tokens", "response_format"}
COMPLETION_KEYS = _SAMPLING | {"prompt"}
EMBEDDING_KEYS = {"model", "input", "encoding_format", "dimensions", "user"}


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None
    except RecursionError:  # e.g. 200,000 nested arrays: a 400, not a 500
        raise InvalidRequest("We could not parse the JSON body of your request: it is nested "
                             "too deeply.") from None
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key in IGNORED:
            continue
        if key in UNSUPPORTED:
            raise InvalidRequest(f"'{key}' is not supported by this server", param=key)
        if key not in allowed:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", param=key)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"'{key}' must be a number", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return float(value)


def int_param(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    """``body[key]`` as an int in [lo, hi], or None if absent.  Raises InvalidRequest."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{key}' must be an integer", param=key)
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    return model


def _common(body: dict[str, Any], limits: Limits) -> tuple[dict[str, Any], bool, bool]:
    n = int_param(body, "n", 1, 1 << 30)
    if n not in (None, 1):
        raise InvalidRequest("only n=1 is supported", param="n")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest("'stop' must be a string or a list of non-empty strings",
                             param="stop")
    if len(stops) > limits.max_stop:
        raise InvalidRequest(f"at most {limits.max_stop} stop sequences", param="stop")
    if any(len(s.encode()) > limits.max_stop_bytes for s in stops):
        raise InvalidRequest(f"a stop sequence is longer than {limits.max_stop_bytes} bytes",
                             param="stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not set(options) <= {"include_usage",
                                                                  "include_obfuscation"}:
            raise InvalidRequest("'stream_options' must be an object with include_usage",
                                 param="stream_options")
        if not stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true",
                                 param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    seed = int_param(body, "seed", -(2**63), 2**63 - 1)
    fields = dict(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=None if seed is None else seed & 0x7FFFFFFF,
        stop=stops,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )
    return fields, stream, include_usage


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...], limits: Limits) -> int:
    for key in keys:
        value = int_param(body, key, 1, 1 << 31)
        if value is not None:
            if value > limits.max_tokens:
                raise InvalidRequest(f"'{key}' is {value}; this node allows at most "
                                     f"{limits.max_tokens}", param=key)
            return value
    return limits.default_max_tokens


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise InvalidRequest("only text content parts are supported",
                                     param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest("message content must be a string or a list of text parts",
                         param=f"messages[{i}].content")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: dict[str, Any], limits: Limits) -> Call:
    """Raises :class:`InvalidRequest` naming the parameter."""
    _check_keys(body, CHAT_KEYS)
    model = _model(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    if len(raw) > limits.max_messages:
        raise InvalidRequest(f"at most {limits.max_messages} messages", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRequest("each message must be an object", param=f"messages[{i}]")
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidRequest(f"unsupported role {m.get('role')!r}; use system, user or "
                                 "assistant", param=f"messages[{i}].role")
        messages.append({"role": role, "content": _content(m, i)})
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidRequest("only response_format {'type': 'text'} is supported",
                             param="response_format")
    fields, stream, include_usage = _common(body, limits)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), limits)
    text = TextRequest(max_tokens=max_tokens, messages=messages, **fields)
    return Call(Request("chat", model, text=text, stream=stream), include_usage)


def parse_completion(body: dict[str, Any], limits: Limits) -> Call:
    _check_keys(body, COMPLETION_KEYS)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string (batches of prompts are not supported)",
                             param="prompt")
    fields, stream, include_usage = _common(body, limits)
    max_tokens = _max_tokens(body, ("max_tokens",), Limits(limits.max_tokens, 16))
    text = TextRequest(max_tokens=max_tokens, prompt=prompt, **fields)
    return Call(Request("completion", model, text=text, stream=stream), include_usage)


def parse_embeddings(body: dict[str, Any], limits: Limits) -> Call:
    _check_keys(body, EMBEDDING_KEYS)
    model = _model(body)
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise InvalidRequest("'input' must be a string or a non-empty array of strings "
                             "(token arrays are not supported)", param="input")
    if len(inputs) > limits.max_inputs:
        raise InvalidRequest(f"at most {limits.max_inputs} inputs per request", param="input")
    if any(not t for t in inputs):
        raise InvalidRequest("'input' must not contain empty strings", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'",
                             param="encoding_format")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported for this model", param="dimensions")
    return Call(Request("embedding", model, inputs=tuple(inputs)), base64=fmt == "base64")
