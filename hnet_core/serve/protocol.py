"""OpenAI's completion and chat-completion requests and responses, for a byte-level base model.

Framework-free: `parse_completion` / `parse_chat` turn a raw request body into a
GenerationRequest or raise RequestError (an HTTP status and one line the client can act on); the
builders write the response bodies and stream chunks with OpenAI's fields. Tokens are bytes here:
`max_tokens` counts UTF-8 bytes, and `usage` reports bytes (the prompt without the BOS byte).

Chat uses a plain-text template (the model is a base model, trained on plain text):

    System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}\\n\\n ... Assistant:

one paragraph per message, role names capitalised, ending with "Assistant:" for the model to
continue. Generation also stops at "\\n\\nUser:" (the model starting the next turn itself).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..errors import HNetError
from ..sampling import SamplingParams
from .scheduler import GenerationRequest

CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOP = "\n\nUser:"
MAX_STOP_STRINGS = 4  # as OpenAI's API
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(self.status,
                                                                                           "invalid_request_error")
        return error_body(self.message, kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    max_tokens: int = 4096  # per request
    max_prompt_bytes: int = 65536  # UTF-8 bytes of the prompt (chat: after the template)
    timeout: float | None = 600.0  # seconds per request, queueing included
    max_total: int | None = None  # prompt + max_tokens bytes a sample may hold (an ONNX export's max_seqlen)


@dataclass
class Parsed:
    request: GenerationRequest
    stream: bool
    model: str


def _load(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise RequestError(400, f"the request body is not valid JSON ({where})") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return data


def _number(data: dict, name: str, default: float, low: float, high: float, low_open: bool = False,
            high_open: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise RequestError(400, f"{name} must be in {interval}, got {value}", name)
    return float(value)


def _integer(data: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {json.dumps(value)[:40]}", name)
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\\udc80) in the JSON string
        raise RequestError(400, f"{what} is not valid Unicode (a lone surrogate)", what) from None


def _common(data: dict, prompt: bytes, limits: Limits, served: str, default_max: int, extra_stop: list[str]) -> Parsed:
    model = data.get("model", served)
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string", "model")
    if model != served:
        raise RequestError(404, f"model {model!r} does not exist; this server serves {served!r}", "model",
                           "model_not_found")
    if len(prompt) > limits.max_prompt_bytes:
        raise RequestError(400, f"the prompt has {len(prompt)} bytes; this server takes at most "
                           f"{limits.max_prompt_bytes}", "prompt")
    max_tokens = _integer(data, "max_tokens", min(default_max, limits.max_tokens), 1, limits.max_tokens)
    if data.get("max_completion_tokens") is not None:
        max_tokens = _integer(data, "max_completion_tokens", None, 1, limits.max_tokens)
    if limits.max_total is not None and len(prompt) + max_tokens > limits.max_total:
        raise RequestError(400, f"prompt ({len(prompt)} bytes) + max_tokens ({max_tokens}) exceed this model's "
                           f"{limits.max_total} bytes", "max_tokens")
    _integer(data, "n", 1, 1, 1)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "stream")
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS):
        raise RequestError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    for s in stop:
        _utf8(s, "stop")
    seed = _integer(data, "seed", None, -(2**63), 2**63 - 1)
    try:
        sampling = SamplingParams(
            temperature=_number(data, "temperature", 1.0, 0.0, 100.0),
            top_p=_number(data, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=_integer(data, "top_k", 0, 0, 256),
            min_p=_number(data, "min_p", 0.0, 0.0, 1.0, high_open=True),
            repetition_penalty=_number(data, "repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
            seed=None if seed is None else seed % 2**63,
        )
    except HNetError as e:
        raise RequestError(400, str(e)) from None
    request = GenerationRequest(prompt, max_tokens, sampling, [*stop, *extra_stop], limits.timeout)
    return Parsed(request, stream, served)


def parse_completion(body: bytes, limits: Limits, served: str) -> Parsed:
    data = _load(body)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise RequestError(400, "prompt is empty; give at least one character", "prompt")
    return _common(data, _utf8(prompt, "prompt"), limits, served, DEFAULT_MAX_TOKENS, [])


def chat_prompt(messages: list[dict]) -> str:
    """The documented plain-text template (module docstring)."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def parse_chat(body: bytes, limits: Limits, served: str) -> Parsed:
    data = _load(body)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise RequestError(400, f"each message needs a role ({', '.join(CHAT_ROLES)}) and a string content",
                               "messages")
    return _common(data, _utf8(chat_prompt(messages), "messages"), limits, served, limits.max_tokens, [CHAT_STOP])


# -- responses ----------------------------------------------------------------------------------------


class Response:
    """The ids and builders of one response (completion or chat)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_bytes: int, generated: int) -> dict:
        return {"prompt_tokens": prompt_bytes, "completion_tokens": generated, "total_tokens": prompt_bytes + generated}

    def full(self, text: str, reason: str, prompt_bytes: int, generated: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(prompt_bytes, generated)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(prompt_bytes, generated)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice]}
