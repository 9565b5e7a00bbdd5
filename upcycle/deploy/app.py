"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of engine replicas.

    client --HTTP--> Ingress (FastAPI: schemas, ChatML, tokenizer, SSE) --handle--> EngineReplica

`EngineReplica` holds the training `GPTModel` through a `ModelRunner` (and, for tp * ep > 1,
the Ray actors of its other ranks) and runs continuous batching (`AsyncEngine`); it autoscales on
ongoing requests. The ingress validates every request before any engine time is spent (bad input
is a 4xx with OpenAI's error body, never a 500) and streams tokens back as server-sent events.
If an engine replica dies mid-request, the ingress sends the request again to another replica
(or the one Serve starts in its place) with the tokens already produced appended to the prompt,
so the client sees one uninterrupted completion (`retries` times at most).

`build_app(spec)` is also a Ray Serve application builder (`import_path:
upcycle.deploy.app:build_app`, `args:` the serve spec), used by `serve run`/`serve deploy` config
files and KubeRay's RayService (see serve-config.yaml and rayservice.yaml beside this module).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from upcycle import runtime
from upcycle.config import ModelConfig
from upcycle.deploy import api
from upcycle.deploy.api import OpenAIError
from upcycle.deploy.engine.batching import check_request
from upcycle.deploy.engine.sampling import SamplingParams
from upcycle.deploy.spec import ServeSpec

log = logging.getLogger(__name__)
http = FastAPI(title="upcycle", description="OpenAI-compatible API over upcycle's models")


@http.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    err = api.validation_error(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status)


@http.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors in OpenAI's shape rather than its {"detail": ...}: a body it could not
    parse (not UTF-8, say), an unknown path or method."""
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "body: could not be parsed; send a JSON object encoded as UTF-8"
    elif exc.status_code in (404, 405):
        message = f"{request.method} {request.url.path}: {message}"
    err = OpenAIError(exc.status_code, message)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


@http.exception_handler(OpenAIError)
async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _openapi() -> dict:
    """FastAPI's document without the 422 it adds to every endpoint with a body: this server
    answers validation errors with 400 and OpenAI's error body (documented per endpoint)."""
    if http.openapi_schema is None:
        doc = get_openapi(title=http.title, version=http.version, description=http.description,
                          routes=http.routes)  # fmt: skip
        for path in doc["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(unused, None)
        http.openapi_schema = doc
    return http.openapi_schema


http.openapi = _openapi


def engine_args(ckpt: str, rc) -> dict:
    """An `Engine`'s settings for checkpoint `ckpt` under `RunnerConfig` `rc` (everything but
    its forward function)."""
    from upcycle.dense.tokenizer import get_tokenizer
    from upcycle.platform.checkpoint import read_model_config

    vocab_limit, eos = engine_limits(ckpt)
    return dict(max_num_seqs=rc.max_num_seqs, max_model_len=rc.max_model_len,
                max_step_tokens=rc.max_step_tokens, eos_ids=eos, vocab_limit=vocab_limit,
                decode=get_tokenizer().decode, num_blocks=rc.kv_blocks(read_model_config(
                    Path(ckpt))), block_size=rc.block_size, prefix_caching=rc.prefix_caching,
                reserve_tokens=rc.reserve_tokens)  # fmt: skip


def engine_limits(ckpt: str) -> tuple[int, tuple[int, ...]]:
    from upcycle.dense.tokenizer import get_tokenizer
    from upcycle.platform.checkpoint import read_model_config

    tok = get_tokenizer()
    vocab_limit = min(read_model_config(Path(ckpt)).vocab_size, tok.vocab_size)
    return vocab_limit, (tok.eot_id, tok.im_end_id)


@serve.deployment
class EngineReplica:
    """One model replica with continuous batching; `generate` streams dicts of `Output`."""

    def __init__(self, ckpt: str, runner: dict, model: str):
        from upcycle.deploy.engine.batching import AsyncEngine
        from upcycle.deploy.engine.metrics import EngineMetrics
        from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig

        rc = RunnerConfig(**runner)
        self.engine = AsyncEngine(
            lambda: ModelRunner(Path(ckpt), rc).forward,
            metrics=EngineMetrics(model),
            **engine_args(ckpt, rc),
        )
        self.engine.wait_ready(timeout=900)

    async def generate(self, prompt: list[int], params: dict) -> AsyncIterator[dict]:
        async for out in self.engine.generate(prompt, SamplingParams(**params)):
            yield dataclasses.asdict(out)

    def stats(self) -> dict:
        """This replica's process and load (for operators and the replica-failure test)."""
        scheduler = self.engine.engine.scheduler
        return {
            "pid": os.getpid(),
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "blocks_used": scheduler.pool.used,
            "blocks_total": scheduler.pool.num_blocks,
            "prefix_cache_hit_tokens": scheduler.prompt_tokens_hit,
            "preemptions": scheduler.preemptions,
        }

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class Ingress:
    def __init__(self, engine: DeploymentHandle, model: str, ckpt: str, runner: dict, retries: int):
        from upcycle.dense.tokenizer import get_tokenizer

        self.engine, self.model, self.retries = engine, model, retries
        self.max_model_len = runner["max_model_len"]
        self.vocab_limit, _ = engine_limits(ckpt)
        self.tok = get_tokenizer()

    @http.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @http.get("/v1/models")
    async def models(self) -> dict:
        entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "upcycle"}
        return {"object": "list", "data": [entry]}

    @http.post("/v1/completions", responses=api.COMPLETION_ERRORS)
    async def completions(self, req: api.CompletionRequest):
        prompt = req.text()
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = self._checked(req, ids, req.sampling(default_max_tokens=16))
        rid = api.new_id("cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(out: dict) -> dict:
                return api.completion(rid, self.model, [(out["text"], out["finish_reason"])], None)

            return self._sse(ids, params, chunk, include_usage, usage_chunk=self._usage_chunk(rid))
        choices, use = await self._collect(ids, params, req.n)
        return api.completion(rid, self.model, choices, use)

    @http.post("/v1/chat/completions", responses=api.COMPLETION_ERRORS)
    async def chat(self, req: api.ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = self.tok.apply_chat_template(messages)
        params = self._checked(req, ids, req.sampling(max(self.max_model_len - len(ids), 1)))
        rid = api.new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [True]

            def chunk(out: dict) -> dict:
                delta = {"content": out["text"]}
                if first[0]:
                    delta, first[0] = {"role": "assistant", **delta}, False
                return api.chat_chunk(rid, self.model, delta, out["finish_reason"])

            def usage_chunk(use: dict) -> dict:
                return api.chat_chunk(rid, self.model, {}, None, use)

            return self._sse(ids, params, chunk, include_usage, usage_chunk=usage_chunk)
        choices, use = await self._collect(ids, params, req.n)
        return api.chat_completion(rid, self.model, choices, use)

    def _usage_chunk(self, rid: str):
        def usage_chunk(use: dict) -> dict:
            body = api.completion(rid, self.model, [], use)
            body["choices"] = []
            return body

        return usage_chunk

    def _checked(self, req, ids: list[int], params: SamplingParams) -> SamplingParams:
        if req.model != self.model:
            raise OpenAIError(
                404,
                f"model {req.model!r} does not exist; this server has {self.model!r}",
                param="model",
                code="model_not_found",
            )
        try:
            check_request(
                ids, params, max_model_len=self.max_model_len, vocab_limit=self.vocab_limit
            )
        except ValueError as e:
            raise OpenAIError(400, str(e), param=str(e).split(":", 1)[0]) from None
        return params

    async def _collect(
        self, ids: list[int], params: SamplingParams, n: int
    ) -> tuple[list[tuple[str, str]], dict]:
        """`n` completions of prompt `ids` (choice k seeded seed + k) and their usage. They are
        sent together, so the replica's prefix cache lets them share the prompt's blocks."""

        async def one(k: int) -> tuple[str, str, int]:
            seed = None if params.seed is None else params.seed + k
            parts, finish, last = [], None, None
            async for out in self._generate(ids, dataclasses.replace(params, seed=seed)):
                parts.append(out["text"])
                finish, last = out["finish_reason"], out
            return "".join(parts), finish, last["completion_tokens"]

        done = await asyncio.gather(*(one(k) for k in range(n)))
        use = api.usage(len(ids), sum(tokens for _, _, tokens in done))
        return [(text, finish) for text, finish, _ in done], use

    def _sse(self, ids, params, chunk, include_usage: bool, *, usage_chunk) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            last = None
            try:
                async for out in self._generate(ids, params):
                    last = out
                    yield f"data: {json.dumps(chunk(out))}\n\n"
                if include_usage and last:
                    use = api.usage(len(ids), last["completion_tokens"])
                    yield f"data: {json.dumps(usage_chunk(use))}\n\n"
            except OpenAIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _generate(self, ids: list[int], params: SamplingParams) -> AsyncIterator[dict]:
        """The engine's outputs, sent again (continuing from the tokens already produced) to
        another replica when the one serving it dies."""
        produced: list[int] = []
        for attempt in range(self.retries + 1):
            left = dataclasses.replace(params, max_tokens=params.max_tokens - len(produced))
            stream = self.engine.options(stream=True).generate.remote(
                ids + produced, dataclasses.asdict(left)
            )
            try:
                async for out in stream:
                    produced += out["token_ids"]
                    out["completion_tokens"] = len(produced)
                    yield out
                return
            except RayActorError as e:
                if attempt == self.retries:
                    raise OpenAIError(503, "the model replica died; try again later") from e
                log.warning("engine replica died (%s); continuing on another one", e)
                await asyncio.sleep(0.5 * (attempt + 1))


def resolve_model(
    spec: ServeSpec, max_model_len: int | None = None
) -> tuple[ServeSpec, Path, ModelConfig]:
    """`spec` fitted to the model it serves (an unset engine.max_model_len is `max_model_len`,
    else the field's default, or the model's context where that is shorter), the checkpoint,
    and its model; checked against the engine layout (no Ray needed: call it before starting
    anything)."""
    from upcycle.deploy.sources import default_cache_dir, resolve
    from upcycle.platform.checkpoint import read_model_config

    ckpt = resolve(spec.model, cache_dir=default_cache_dir())
    cfg = read_model_config(ckpt)
    spec = spec.model_copy(update={"engine": spec.engine.fit_context(cfg, max_model_len)})
    spec.engine.check(cfg)
    return spec, ckpt, cfg


def build_app(args: dict | ServeSpec):
    """The Serve application for a serve spec (a Ray Serve application builder)."""
    spec = args if isinstance(args, ServeSpec) else ServeSpec.parse(dict(args))
    spec, ckpt, cfg = resolve_model(spec)
    rc = spec.engine
    scaling = spec.autoscaling.model_dump(exclude_none=True)
    logs = {"log_level": spec.log_level}
    engine = EngineReplica.options(
        autoscaling_config=scaling,
        logging_config=logs,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": spec.engine.cpus_per_rank,
            "num_gpus": spec.engine.gpus_per_rank,
            "runtime_env": {"env_vars": runtime.ENGINE_THREAD_ENV},
        },
        health_check_period_s=5,
    ).bind(str(ckpt), rc.model_dump(), spec.name or cfg.name)
    return Ingress.options(max_ongoing_requests=1000, logging_config=logs).bind(
        engine, spec.name or cfg.name, str(ckpt), rc.model_dump(), spec.retries
    )


def run(spec: ServeSpec, *, blocking: bool = False) -> str:
    """Deploy `spec` on the connected Ray cluster; returns the base URL."""
    logging.getLogger("ray.serve").setLevel(spec.log_level)  # this process's Serve lines too
    serve.start(
        http_options={"host": spec.http.host, "port": spec.http.port},
        logging_config={"log_level": spec.log_level},
    )
    serve.run(
        build_app(spec), name=spec.app_name, route_prefix=spec.route_prefix, blocking=blocking
    )
    return f"http://{spec.http.host}:{spec.http.port}{spec.route_prefix.rstrip('/')}"
