"""The OpenAI-compatible HTTP API (FastAPI): `/health`, `/v1/models`, `/v1/chat/completions`,
`/v1/completions` (streaming as server-sent events or not) and `/metrics` (Prometheus text).

Requests are checked here and answered with OpenAI-style errors (`{"error": {"message", "type",
"param", "code"}}`): 400 for malformed or invalid input, 404 for an unknown model or route, 429
when the queue is full, 503 before the model is compiled. Nothing a client sends reaches the
device loop unchecked, so a bad request never disturbs the others.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from medusa_jax.errors import MedusaError
from medusa_jax.model.tokenizer import encode_chat
from medusa_jax.serve.scheduler import QueueFull, Request, Scheduler


class ApiError(Exception):
  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def response(self) -> JSONResponse:
    return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                   "code": self.code}}, status_code=self.status)


def _field(body: dict, name: str, kinds, default=None, *, check=None, rule: str = ""):
  """`body[name]` if it has one of the types `kinds` (and passes `check`), else a 400."""
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
    raise ApiError(400, f"'{name}' must be {rule or kinds}, got {value!r}", param=name)
  if not isinstance(value, kinds) or (check is not None and not check(value)):
    raise ApiError(400, f"'{name}' must be {rule}, got {json.dumps(value)[:60]}", param=name)
  return value


def _messages(body: dict) -> list[dict]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
  out = []
  for m in messages:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
      raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                 for p in content):
        raise ApiError(400, "message content parts must be text parts", param="messages")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, "each message needs string content", param="messages")
    out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
  return out


def _prompt(body: dict) -> str:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
    prompt = prompt[0]
  if not isinstance(prompt, str):
    raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
  return prompt


def create_app(scheduler: Scheduler, model_name: str) -> FastAPI:
  """The app for `scheduler` serving `model_name`; its start-up compiles what serving needs first
  in the background (`/health` answers 503 until then, then 200 with what is compiled, while the
  other programs keep compiling) and its shutdown drains the scheduler."""
  tokenizer = scheduler.loaded.tokenizer
  metrics = scheduler.metrics
  state: dict[str, Any] = {"error": None}

  def warm_up():
    try:
      scheduler.start()
    except Exception as e:  # reported by /health
      state["error"] = f"{type(e).__name__}: {e}"

  async def lifespan(app):
    threading.Thread(target=warm_up, name="medusa-warm-up", daemon=True).start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, scheduler.shutdown)

  app = FastAPI(title="medusa-jax", lifespan=lifespan)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return e.response()

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return ApiError(e.status_code, str(e.detail), kind=kind).response()

  @app.get("/health")
  async def health():
    if state["error"]:
      return JSONResponse({"status": "error", "error": state["error"]}, status_code=500)
    if not scheduler.ready:
      return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok", "compiled": scheduler.compiled}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "medusa-jax"}]}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

  async def complete(http: HttpRequest, chat: bool):
    endpoint = "chat" if chat else "completions"
    try:
      try:
        body = await http.json()
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
      if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
      if not scheduler.ready:
        raise ApiError(503, "the model is still loading", kind="server_error", code="not_ready")
      model = body.get("model")
      if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
      if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
      if _field(body, "n", int, 1, check=lambda n: n == 1, rule="1 (one choice per request)") != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
      request = _request(body, chat)
      stream = _field(body, "stream", bool, False, rule="true or false")
      options = _field(body, "stream_options", dict, {}, rule="an object")
      usage_in_stream = bool(options.get("include_usage", False))
      loop = asyncio.get_running_loop()
      events: asyncio.Queue = asyncio.Queue()
      request.on_event = lambda text, done: loop.call_soon_threadsafe(events.put_nowait, (text, done))
      scheduler.submit(request)
    except ApiError as e:
      metrics.requests.labels(endpoint, str(e.status)).inc()
      return e.response()
    except QueueFull as e:
      metrics.requests.labels(endpoint, "429").inc()
      return ApiError(429, str(e), kind="rate_limit_error", code="queue_full").response()
    except MedusaError as e:  # a prompt too long for the context, ...
      metrics.requests.labels(endpoint, "400").inc()
      return ApiError(400, str(e)).response()
    metrics.requests.labels(endpoint, "200").inc()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if stream:
      return StreamingResponse(_stream(request, events, rid, created, chat, usage_in_stream),
                               media_type="text/event-stream")
    try:
      while True:
        try:
          _, done = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            request.cancel()
            return Response(status_code=499)
          continue
        if done:
          break
    except asyncio.CancelledError:
      request.cancel()
      raise
    choice = ({"index": 0, "message": {"role": "assistant", "content": request.text}} if chat
              else {"index": 0, "text": request.text, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": [{**choice, "finish_reason": request.finish_reason}],
            "usage": _usage(request)}

  def _request(body: dict, chat: bool) -> Request:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
      raise ApiError(400, f"'{name}' must be a positive integer, got {json.dumps(max_tokens)}", param=name)
    temperature = float(_field(body, "temperature", (int, float), 1.0,  # OpenAI's default
                               check=lambda t: 0 <= t <= 2, rule="a number in [0, 2]"))
    top_p = float(_field(body, "top_p", (int, float), 1.0, check=lambda p: 0 < p <= 1, rule="a number in (0, 1]"))
    seed = _field(body, "seed", int, 0, rule="an integer")
    ignore_eos = _field(body, "ignore_eos", bool, False, rule="true or false")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
      raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    ids = encode_chat(tokenizer, _messages(body) if chat else _prompt(body), chat)
    room = scheduler.max_context - len(ids)
    if room < 1:
      raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is "
                          f"{scheduler.max_context}", param="messages" if chat else "prompt",
                     code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
      raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {name} ({max_tokens}) exceeds this "
                          f"server's context of {scheduler.max_context} tokens", param=name,
                     code="context_length_exceeded")
    return Request(ids, max_tokens or min(room, 512), temperature=temperature, top_p=top_p,
                   seed=seed % (1 << 32), stop=tuple(stop or ()), ignore_eos=ignore_eos)

  def _usage(r: Request) -> dict:
    return {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids),
            "total_tokens": len(r.prompt_ids) + len(r.token_ids)}

  async def _stream(r: Request, events: asyncio.Queue, rid: str, created: int, chat: bool, usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
      if chat:
        delta = ({"role": "assistant", "content": text or ""} if first else
                 ({"content": text} if text is not None else {}))
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
      else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
      return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                                    "choices": [choice]}) + "\n\n"

    try:
      if chat:
        yield chunk("", None, first=True)
      while True:
        text, done = await events.get()
        if text:
          yield chunk(text, None)
        if done:
          break
      yield chunk(None, r.finish_reason)
      if usage:
        yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                                     "choices": [], "usage": _usage(r)}) + "\n\n"
      yield "data: [DONE]\n\n"
    finally:
      if r.finish_reason is None:  # the client went away mid-stream: free its slot
        r.cancel()

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    return await complete(http, chat=True)

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    return await complete(http, chat=False)

  return app
