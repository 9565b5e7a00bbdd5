"""The OpenAI wire format: request schemas (pydantic), error bodies, response and chunk objects.

Unknown request fields are ignored (clients send fields such as `user`); fields we cannot honour
(logprobs, echo, penalties, n > 1 with streaming) are refused with a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from upcycle.deploy.engine.sampling import SamplingParams


class OpenAIError(Exception):
    """An error the client caused: answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = None  # the request field at fault, e.g. "max_tokens"
    code: str | None = None  # e.g. "model_not_found"


class ErrorBody(BaseModel):
    """What every error answer carries (OpenAI's shape)."""

    error: ErrorDetail


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


# Every status the completion endpoints answer besides 200, for the OpenAPI document (FastAPI's
# default 422 never happens: validation errors are 400s, see `validation_error`).
COMPLETION_ERRORS = {
    400: _error("Invalid request: not JSON, a missing or out-of-range field, an unsupported "
                "option, or a prompt + max_tokens beyond the context; `param` names the field"),
    404: _error("`model` is not the model this server has (GET /v1/models lists it)"),
    503: _error("The model replica died mid-request and no other could finish it; retry"),
}  # fmt: skip


def validation_error(errors: list[dict]) -> OpenAIError:
    """A 400 naming the first invalid field of a request (pydantic's error list)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"body: not valid JSON ({first.get('msg')})")
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid")
    if not loc and first.get("type") == "value_error":  # a check across fields ("n: why")
        msg = msg.removeprefix("Value error, ")
        return OpenAIError(400, msg, param=msg.split(":", 1)[0] if ": " in msg else None)
    return OpenAIError(400, f"{loc or 'body'}: {msg}", param=loc or None)


# choices one request may ask for (`n`)
MAX_CHOICES = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the served model's name, as GET /v1/models lists it (else 404)")
    max_tokens: int | None = Field(
        default=None, ge=1, description="at most the context length minus the prompt's tokens"
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; as vLLM offers it
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES,
        description="completions of the prompt (they share its KV-cache blocks); 1 when streaming",
    )  # fmt: skip
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, description="up to 4 non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = Field(default=None, description="not supported: leave unset")
    presence_penalty: float = Field(default=0.0, description="not supported: leave at 0")
    frequency_penalty: float = Field(default=0.0, description="not supported: leave at 0")

    @model_validator(mode="after")
    def _supported(self):
        if self.n > 1 and self.stream:
            raise ValueError("n: several choices are not streamed; set stream false or n 1")
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server; leave it unset")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty: not supported; leave them at 0")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return self

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stops),
        )


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    echo: bool = False

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (a list of one string)")
        if self.echo:
            raise ValueError("echo: not supported by this server; leave it false")
        return self

    def text(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            from dataclasses import replace

            params = replace(params, max_tokens=self.max_completion_tokens)
        return params


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    rid: str, model: str, choices: list[tuple[str, str | None]], use: dict | None
) -> dict:
    """A completion (or one streamed chunk of it): `choices` (text, finish reason)."""
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(choices)
        ],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_completion(rid: str, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use=None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if use else [{"index": 0, "delta": delta, "finish_reason": finish}],
        **({"usage": use} if use else {}),
    }
