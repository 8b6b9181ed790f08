"""The OpenAI-compatible server, as a live process on 127.0.0.1 driven by the official `openai`
client: streamed and whole answers agree, concurrent greedy requests equal `Engine.generate` alone,
seeded sampling reproduces, stop strings, disconnects free their slot, bad input gets OpenAI-style
errors while the server keeps serving, /metrics parses, SIGTERM finishes in-flight requests."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import numpy as np
import pytest
from helpers import start_server

from medusa_jax.errors import MedusaError

MODEL = "random:tiny"


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
  from helpers import random_heads

  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.medusa.heads import HeadsConfig
  from medusa_jax.medusa.tree import MC_SIM_7B_63
  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  out = tmp_path_factory.mktemp("serve") / "heads"
  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  medusa_format.write(str(out), random_heads(base, HeadsConfig(4, 1, True), scale=0.3), base,
                      base_model=MODEL, lm_head_copies=False)
  # the server grafts a 3-token lookup chain onto the tree
  (out / "tree.json").write_text(json.dumps({"paths": [list(p) for p in MC_SIM_7B_63 if len(p) <= 4],
                                             "lookup": 3}))
  return str(out)


@pytest.fixture(scope="module")
def server(tmp_path_factory, heads_dir):
  proc, base = start_server(tmp_path_factory.mktemp("log"), "--model", MODEL, "--heads", heads_dir,
                      "--max-batch", "4", "--max-context", "256")
  yield base
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
  import openai

  return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(heads_dir):
  import medusa_jax

  return medusa_jax.load(MODEL, heads=heads_dir)


def _chat(client, content, **kw):
  return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server, client):
  assert [m.id for m in client.models.list().data] == [MODEL]
  health = httpx.get(f"{server}/health").json()
  assert health["status"] == "ok" and health["compiled"]["programs"] <= health["compiled"]["total"]


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_text_equals_the_whole_answer(client, chat):
  kw = dict(model=MODEL, max_tokens=40, temperature=0.8, seed=7)
  if chat:
    whole = client.chat.completions.create(messages=[{"role": "user", "content": "hello there"}], **kw)
    parts = list(client.chat.completions.create(messages=[{"role": "user", "content": "hello there"}],
                                                stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    text = whole.choices[0].message.content
  else:
    whole = client.completions.create(prompt="once upon a time", **kw)
    parts = list(client.completions.create(prompt="once upon a time", stream=True,
                                           stream_options={"include_usage": True}, **kw))
    streamed = "".join(p.choices[0].text for p in parts if p.choices)
    text = whole.choices[0].text
  assert streamed == text and whole.usage.completion_tokens > 0
  assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
  assert parts[-1].usage.prompt_tokens == whole.usage.prompt_tokens
  finish = [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason]
  assert finish == [whole.choices[0].finish_reason] and finish[0] in ("stop", "length")


def test_concurrent_requests_greedy_equal_the_engine_alone_and_seeds_reproduce(client, engine):
  """8 requests of different lengths and settings at once (more than the 4 slots): each greedy one
  is what `Engine.generate` gives it alone; each sampled one is the same when sent again."""
  prompts = [f"question number {i}: " + "x" * (7 * i) for i in range(8)]
  settings = [dict(max_tokens=10 + 6 * i, temperature=0.0 if i % 2 == 0 else 0.9, top_p=1.0 if i % 4 < 2 else 0.8,
                   seed=i) for i in range(8)]

  def run():
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      futures = [pool.submit(_chat, client, p, **s) for p, s in zip(prompts, settings)]
      return [f.result().choices[0].message.content for f in futures]

  first, second = run(), run()
  assert first == second
  for p, s, text in zip(prompts, settings, first):
    if s["temperature"] == 0:
      alone = engine.generate(p, max_new_tokens=s["max_tokens"], mode="baseline")
      assert text == alone.text


def test_stop_strings_cut_the_answer(client):
  full = _chat(client, "tell me something", max_tokens=40, temperature=0).choices[0].message.content
  stop = full[10:13]
  assert len(full) > 13 and stop.strip()
  cut = _chat(client, "tell me something", max_tokens=40, temperature=0, stop=[stop]).choices[0]
  assert cut.finish_reason == "stop" and cut.message.content == full[: full.find(stop)]


def _metric(server, name) -> float:
  """The summed value of the samples called `name` (e.g. a counter's `..._total`)."""
  from prometheus_client.parser import text_string_to_metric_families

  text = httpx.get(f"{server}/metrics").text
  return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_metrics_parse_and_count(server, client):
  _chat(client, "count me", max_tokens=8, temperature=0)
  from prometheus_client.parser import text_string_to_metric_families

  names = {f.name for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
  assert {"medusa_requests", "medusa_completion_tokens", "medusa_active_rows", "medusa_queue_depth",
          "medusa_time_to_first_token_seconds", "medusa_inter_token_latency_seconds",
          "medusa_accepted_tokens_per_step", "medusa_step_seconds"} <= names
  assert _metric(server, "medusa_completion_tokens_total") >= 8


def test_disconnect_mid_stream_frees_the_slot(server, client):
  body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}], "max_tokens": 200,
          "temperature": 0, "stream": True, "ignore_eos": True}
  with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
    assert next(r.iter_lines()).startswith("data: ")
  deadline = time.time() + 30
  while _metric(server, "medusa_active_rows") > 0 and time.time() < deadline:
    time.sleep(0.2)
  assert _metric(server, "medusa_active_rows") == 0
  assert _chat(client, "still there?", max_tokens=4, temperature=0).choices[0].message.content is not None


@pytest.mark.parametrize("body, status, param, fragment", [
    ("{not json", 400, None, "not valid JSON"),
    ([1, 2], 400, None, "JSON object"),
    ({"model": MODEL}, 400, "messages", "'messages' must be a non-empty list"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", "'messages' must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages", "string content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens",
     "positive integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400,
     "max_tokens", "positive integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature", "a number in [0, 2]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages", "context"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, 400,
     "max_tokens", "exceeds"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, param,
                                                                     fragment):
  content = body if isinstance(body, str) else json.dumps(body)
  r = httpx.post(f"{server}/v1/chat/completions", content=content,
                 headers={"content-type": "application/json"}, timeout=30)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
  assert error["param"] == param
  assert _chat(client, "fine?", max_tokens=3, temperature=0).choices[0].finish_reason in ("stop", "length")


def test_unknown_route_is_a_json_404(server):
  r = httpx.get(f"{server}/v1/nothing")
  assert r.status_code == 404 and "error" in r.json()


def test_full_queue_answers_429_and_sigterm_finishes_in_flight(tmp_path):
  """One slot and a queue of one: a third concurrent request gets 429. SIGTERM while a request
  streams: it still completes, and the process exits without a traceback. This server drafts with
  a draft model (the target's first layer, `--draft-model self:1`, in its own KV cache rows); its
  greedy answer is `Engine.generate`'s."""
  import jax.numpy as jnp

  import medusa_jax

  proc, base = start_server(tmp_path, "--model", MODEL, "--draft-model", "self:1", "--draft-tokens", "2",
                      "--max-batch", "1", "--max-queue", "1", "--max-context", "256", "--chunk-steps", "1")
  body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 150,
          "temperature": 0, "ignore_eos": True}
  try:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = [pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=120)
                 for _ in range(3)]
      answers = [f.result() for f in futures]
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 200 and 429 in codes, codes
    text = next(a for a in answers if a.status_code == 200).json()["choices"][0]["message"]["content"]
    engine = medusa_jax.load(MODEL, heads=None)
    engine.eos_ids = jnp.asarray([-1], jnp.int32)  # ignore_eos
    assert text == engine.generate("go", max_new_tokens=150).text
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
      lines = r.iter_lines()
      assert next(lines).startswith("data: ")
      proc.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    finish = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
    assert finish[-1] == "length"
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained
    assert "Traceback" not in "".join(p.read_text() for p in tmp_path.glob("server-*.log"))
  finally:
    if proc.poll() is None:
      proc.kill()


@pytest.mark.slow
def test_embedded_model_with_shipped_heads(tmp_path):
  """The embedded model and its shipped heads: greedy answers equal `Engine.generate` alone,
  streamed or not, for two requests at once."""
  import openai

  import medusa_jax

  proc, base = start_server(tmp_path, "--max-batch", "2", "--max-context", "256")
  try:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    engine = medusa_jax.load()
    questions = ["What is the capital of France?", "Write a haiku about rain."]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      answers = list(pool.map(lambda q: client.chat.completions.create(
          model=medusa_jax.EMBEDDED_MODEL, messages=[{"role": "user", "content": q}], max_tokens=48,
          temperature=0).choices[0].message.content, questions))
    for q, a in zip(questions, answers):
      assert a == engine.generate(q, max_new_tokens=48).text
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.mark.parametrize("settings,size", [({}, 67), (dict(mode="medusa", lookup=0), 64),
                                           (dict(mode="medusa", lookup=5, min_ngram=0), 69),
                                           (dict(mode="lookup", lookup=6), 7), (dict(mode="lookup", draft_tokens=2), 3),
                                           (dict(mode="draft", draft_tokens=3), 4), (dict(mode="baseline"), 0)])
def test_the_server_drafts_as_generate_does(engine, settings, size):
  """One resolution of drafting: for the same settings the scheduler and `Engine.generate_ids`
  run the same drafter (by default the heads' 63-node tree with their directory's 3-token lookup
  chain; prompt lookup of `lookup` tokens, else `draft_tokens`; the draft model's chain), and the
  server refuses what it does not serve with a one-line error."""
  from medusa_jax.decode.config import GenerationConfig
  from medusa_jax.serve.scheduler import Scheduler

  engine.set_draft_model("self:1")
  try:
    config = GenerationConfig(**settings)
    plan, served = engine.plan(config), Scheduler(engine.loaded, config, max_batch=2, max_context=256)
    assert served.mode == plan.mode == settings.get("mode", "medusa")
    assert served.drafter == plan.drafter and plan.tree_size == size
  finally:
    engine.set_draft_model(None)
  with pytest.raises(MedusaError, match="mode 'beam' is not available here"):
    Scheduler(engine.loaded, GenerationConfig(mode="beam"))


def test_chunk_choice_follows_greedy_and_sampling_rows(engine):
  """The scheduler's choice per chunk (no device work): plain, the heads' top guess, their tree,
  or their tree with the lookup chain. Tokens per step are kept per choice and apart for greedy
  and sampling rows, a chunk expects their mean over its live rows and takes the most tokens per
  second; the losing choices still run, in turn, after 32, 64, 128, 256, 256 chunks of the winner
  (per row bucket); a chunk takes the span measured fastest, and step times follow the chunks' own
  (a pause counting as twice the average at most)."""
  from medusa_jax.serve.scheduler import Request, Scheduler

  s = Scheduler(engine.loaded, max_batch=4, max_context=1024)
  assert s.names == ("plain", "tree2", "tree64", "tree67")  # MC_SIM_7B_63's 63 nodes and a 3-token chain
  cost = (0.010, 0.012, 0.020, 0.021)
  s.step_seconds = {(b, c, span): cost[c] for b in s.buckets for c in range(4) for span in s.spans}
  greedy, sampled = Request([1], 8, temperature=0.0), Request([1], 8, temperature=0.9)
  s._live = [greedy, sampled, None, None]
  assert s.tokens_per_step[3, False] == s.tokens_per_step[3, True] == (s.tree.depth + 2) / 2  # a prior
  s._observe_tokens(3, np.asarray([4 * s.chunk_steps, s.chunk_steps]))  # greedy rows 4 tokens a step, sampled 1
  assert (s.tokens_per_step[3, False], s.tokens_per_step[3, True]) == (4.0, 1.0)  # the first chunk replaces it
  s._observe_tokens(3, np.asarray([2 * s.chunk_steps, 0]))  # then a running average (the sampled row did not run)
  assert (s.tokens_per_step[3, False], s.tokens_per_step[3, True]) == pytest.approx((3.6, 1.0))
  s.tokens_per_step = {(1, False): 1.5, (1, True): 1.1, (2, False): 2.9, (2, True): 1.2,
                       (3, False): 3.0, (3, True): 1.2}
  # tokens/s for both rows: plain 100, top guess 1.3 / 0.012 = 108, tree 102.5, tree and chain 100
  assert s._choose(2) == (1, s._span(2, 1))

  def picks(rows, chunks=800):
    s._live = rows + [None] * (4 - len(rows))
    return [s._choose(1)[0] for _ in range(chunks)]

  def losers(picked):
    return [(i, c) for i, c in enumerate(picked) if c != picked[0]][:5]

  # a sampling row: plain wins; the others run after 32, 64, 128, 256, 256 chunks of it, in turn
  assert losers(picks([sampled])) == [(32, 1), (97, 2), (226, 3), (483, 1), (740, 2)]
  greedy_picks = picks([greedy])  # a greedy row: the tree (2.9 / 0.02) beats it with the chain (3.0 / 0.021)
  assert greedy_picks[0] == 2 and losers(greedy_picks)[0] == (32, 0)
  s._live = [sampled, sampled, None, None]
  assert s._choose(2)[0] == 0  # plain wins for two sampling rows: bucket 2's winner changes...
  assert s._exploration[1].every == 256  # ...and bucket 1 keeps its count
  span = s._span(1, 0)
  assert span == s.spans[0] and len(s.spans) > 1
  s.step_seconds[(1, 0, s.spans[1])] = 0.005  # the longer span measured faster: chunks take it
  assert s._span(1, 0) == s.spans[1]
  s.step_seconds[(1, 0, s.spans[1])] = 0.01
  s._observe_time((1, 0, span), 1.0)  # a pause: counts as twice the average
  assert s.step_seconds[(1, 0, span)] == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)
  s._live = [sampled, None, None, None]
  assert s._choose(1)[0] == 0
  for _ in range(20):  # plain chunks turn out slow (say the host is busy): the sampled row now drafts
    for longer in s.spans:
      s._observe_time((1, 0, longer), 0.03)
  assert s._choose(1)[0] == 1 and s._exploration[1].every == 32


@pytest.fixture(scope="module")
def eagle_engine(tmp_path_factory):
  """`random:tiny` with a random EAGLE drafter (`helpers.write_tiny_eagle`)."""
  from helpers import write_tiny_eagle

  import medusa_jax

  path = tmp_path_factory.mktemp("eagle") / "eagle"
  write_tiny_eagle(path)
  return medusa_jax.load(MODEL, heads=str(path))


@pytest.mark.parametrize("drafter", ["heads", "eagle"])
def test_plain_serving_starts_before_the_drafting_programs_compile(request, drafter):
  """Start-up compiles plain decoding first and serves it at once; the drafting programs compile
  afterwards and join the choices. Greedy answers equal `Engine.generate_ids` before and after,
  and once they are compiled, drafting chunks run (Medusa heads with a lookup chain; an EAGLE
  drafter, which takes the plain chunks' target features)."""
  import threading

  from medusa_jax.serve.scheduler import Request, Scheduler

  engine = request.getfixturevalue("engine" if drafter == "heads" else "eagle_engine")

  lines = []
  s = Scheduler(engine.loaded, max_batch=2, max_context=256, log=lines.append)
  s.start(compile_rest=False)
  prompts = [[5, 9, 11, 5, 9, 12, 40], [7, 3, 3, 8, 1, 9, 4, 4, 2, 30, 31]]
  want = engine.generate_ids(prompts, max_new_tokens=20, mode="baseline")

  def serve():
    done = [threading.Event() for _ in prompts]
    requests = [Request(p, 20, on_event=lambda _, end, e=e: end and e.set()) for p, e in zip(prompts, done)]
    for r in requests:
      s.submit(r)
    assert all(e.wait(120) for e in done)
    for r, row, n in zip(requests, want.tokens, want.num_tokens):
      assert r.token_ids == list(row[:n])

  try:
    serve()
    assert s.compiled["choices"] == ["plain"] and s.compiled["programs"] < s.compiled["total"]
    assert s.metrics.chunks.labels("plain")._value.get() > 0 and not s.metrics.chunks.labels(s.names[-1])._value.get()
    s.compile_rest()
    assert s.compiled["programs"] == s.compiled["total"] and s.compiled["choices"] == list(s.names)
    serve()
    assert s.metrics.chunks.labels(s.names[-1])._value.get() > 0  # new programs are measured on first use
    assert lines[0].startswith("compiling plain") and lines[-1].startswith(f"all {s.compiled['total']} programs")
  finally:
    s.shutdown(timeout=5)
