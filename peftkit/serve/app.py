"""The HTTP layer: OpenAI-compatible routes over an :class:`~peftkit.serve.engine.Engine`.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``"stream": true`` as server-sent events ending in
``data: [DONE]``, and ``stream_options.include_usage`` for a final usage chunk), ``POST /v1/adapters``
(``{"name", "path"}``: load at run time, from folders under the allowed roots only) and
``DELETE /v1/adapters/{name}``. The ``model`` field names an adapter, ``"base"`` for none.

Every request body is read with a size cap (413 beyond it) and parsed and checked here, so a
malformed one gets a 400 with an OpenAI-style ``{"error": {...}}`` body and never reaches the
model; an unknown adapter is a 404, a full queue a 503 with ``Retry-After``. Unknown routes and
methods get the same error shape (404, 405). Unexpected exceptions become a 500 for that request
only.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import BASE_NAME, Engine, EngineFull, Job

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers


class Limits:
    """Request bounds: body bytes, prompt tokens, ``max_tokens``, prompts per request, stop strings."""

    def __init__(self, max_body_bytes: int = 1 << 20, max_prompt_tokens: int = 4096, max_tokens: int = 1024,
                 max_prompts: int = 16, max_stop: int = 4):
        self.max_body_bytes, self.max_prompt_tokens, self.max_tokens = max_body_bytes, max_prompt_tokens, max_tokens
        self.max_prompts, self.max_stop = max_prompts, max_stop


# ----- request checking ----------------------------------------------------------------------
def _number(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}.", param=key)
    return v


def _sampling(body: dict, limits: Limits, chat: bool) -> dict:
    # chat clients expect a whole answer (OpenAI: up to the context); completions default to 16
    if chat and body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    default_max = limits.max_tokens if chat else min(16, limits.max_tokens)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > limits.max_stop
            or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {limits.max_stop} non-empty strings.",
                       param="stop")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1 here; send the request again for more samples.", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    _stream_options(body)
    return dict(max_tokens=_number(body, "max_tokens", default_max, 1, limits.max_tokens, integer=True),
                temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)), stop=stop)


def _stream_options(body: dict) -> bool:
    """Whether the stream ends with a usage chunk (``stream_options: {"include_usage": true}``)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not body.get("stream", False):
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}.",
                       param="stream_options")
    return opts.get("include_usage", False)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "peftkit"}


def _adapter(body: dict, engine: Engine) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required: an adapter name from /v1/models, or 'base'.", param="model")
    if not engine.has_adapter(name):
        raise ApiError(404, f"The model {name!r} does not exist; loaded: {['base'] + sorted(engine.adapters)}.",
                       kind="not_found_error", param="model")
    return name


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > 256:
        raise ApiError(400, "'messages' must be a non-empty list of at most 256 {role, content} objects.",
                       param="messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, "each message needs a 'role' (system, user, assistant, developer or tool).",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, "only text content parts are supported.", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "each message's 'content' must be a string.", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


async def _read_json(request, limits: Limits) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"Request body over {limits.max_body_bytes} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"Request body over {limits.max_body_bytes} bytes.")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return body


# ----- running jobs from the event loop ------------------------------------------------------
def _job(engine: Engine, ids: list[int], adapter: str, params: dict) -> tuple[Job, asyncio.Queue]:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(kind, value):  # runs on the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass

    return Job(prompt_ids=ids, adapter=adapter, emit=emit, **params), events


def _prompt_ids(engine: Engine, text: str, limits: Limits, special: bool = True) -> list[int]:
    ids = engine.encode(text, special)
    if not ids:
        raise ApiError(400, "The prompt is empty after tokenisation.", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"The prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}.", param="prompt")
    return ids


def create_app(engine: Engine, limits: Optional[Limits] = None, adapter_roots: tuple[str, ...] = ()):
    """The FastAPI application serving ``engine``.

    ``adapter_roots``: folders under which ``POST /v1/adapters`` may load adapters (none: run-time
    loading is refused with 403).
    """
    limits = limits or Limits()
    roots = tuple(os.path.realpath(r) for r in adapter_roots)
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status, message, kind="invalid_request_error", param=None, headers=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc.status, exc.message, exc.kind, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # unknown route (404), wrong method (405)
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}; see GET /v1/models and docs/serving.md."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, message, kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(400, f"Invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return error(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/v1/models")
    async def models():
        names = [BASE_NAME] + sorted(engine.adapters)
        return {"object": "list", "data": [_model_card(n) for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if not engine.has_adapter(model_id):
            raise ApiError(404, f"The model {model_id!r} does not exist; loaded: {['base'] + sorted(engine.adapters)}.",
                           "not_found_error", "model")
        return _model_card(model_id)

    async def run(request: Request, chat: bool):
        body = await _read_json(request, limits)
        params = _sampling(body, limits, chat)
        adapter = _adapter(body, engine)
        if chat:
            messages = _messages(body)
            try:
                prompts = [engine.chat_prompt(messages)]
            except Exception as e:  # e.g. a template that rejects a role order
                raise ApiError(400, f"The chat template rejected these messages: {e}", param="messages") from None
        else:
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if (not isinstance(prompts, list) or not 0 < len(prompts) <= limits.max_prompts
                    or not all(isinstance(p, str) for p in prompts)):
                raise ApiError(400, f"'prompt' must be a string or a list of 1 to {limits.max_prompts} strings.",
                               param="prompt")
        # a chat template writes its own special tokens (BOS); don't add them twice
        ids = [_prompt_ids(engine, p, limits, special=not chat) for p in prompts]
        jobs = [_job(engine, i, adapter, params) for i in ids]
        try:
            for job, _ in jobs:
                engine.submit(job)
        except EngineFull as e:
            for job, _ in jobs:
                job.cancelled.set()
            raise ApiError(503, str(e), "server_overloaded", headers={"Retry-After": str(e.retry_after)}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = dict(id=rid, created=int(time.time()), model=adapter)
        if body.get("stream", False):
            return StreamingResponse(_stream(jobs, meta, chat, _stream_options(body)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(jobs, meta, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/adapters", status_code=201)
    async def load(request: Request):
        body = await _read_json(request, limits)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (BASE_NAME, "__base__"):
            raise ApiError(400, "'name' must be 1-64 letters, digits, '.', '_' or '-' (not 'base').", param="name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "'path' must be the adapter's folder on the server.", param="path")
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r + os.sep) for r in roots):
            raise ApiError(403, "Loading from this path is not allowed; start the server with --adapter-root "
                                "pointing at a folder that contains it.", "permission_error", "path")
        if name in engine.adapters:
            raise ApiError(409, f"An adapter named {name!r} is already loaded; DELETE it first.", param="name")
        try:
            await run_in_threadpool(engine.load_adapter, name, real)
        except (OSError, ValueError) as e:  # missing files, bad config or weights (ConfigError, CheckpointError)
            raise ApiError(400, f"Could not load {path!r}: {e}", param="path") from None
        return {**_model_card(name), "created": int(time.time())}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        try:
            await run_in_threadpool(engine.unload_adapter, name)
        except KeyError:
            raise ApiError(404, f"No adapter named {name!r} is loaded.", "not_found_error", "name") from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def _usage(dones: list[dict]) -> dict[str, Any]:
    p = sum(d["prompt_tokens"] for d in dones)
    c = sum(d["completion_tokens"] for d in dones)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(jobs, meta: dict, chat: bool):
    texts, dones = [], []
    try:
        for _, events in jobs:
            parts = []
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    parts.append(value)
                elif kind == "error":
                    raise ApiError(500, value, "server_error")
                else:
                    dones.append(value)
                    break
            texts.append("".join(parts))
    finally:
        for job, _ in jobs:
            job.cancelled.set()  # a client gone before the end frees its rows
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": d["finish_reason"]}
                   for i, (t, d) in enumerate(zip(texts, dones))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(dones)}
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": d["finish_reason"]}
               for i, (t, d) in enumerate(zip(texts, dones))]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(dones)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(jobs, meta: dict, chat: bool, include_usage: bool = False):
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}  # OpenAI: null on every chunk but the last
    dones = []

    def chunk(i, text=None, finish=None, role=False):
        if chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**meta, "object": obj, "choices": [choice], **extra})

    try:
        for i, (_, events) in enumerate(jobs):
            if chat:
                yield chunk(i, role=True)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield chunk(i, value)
                elif kind == "error":
                    yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                    break
                else:
                    dones.append(value)
                    yield chunk(i, finish=value["finish_reason"])
                    break
        if include_usage and len(dones) == len(jobs):
            yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(dones)})
        yield "data: [DONE]\n\n"
    finally:
        for job, _ in jobs:
            job.cancelled.set()
