"""The host side of continuous batching: a queue of requests, a thread that admits them into free
slots (`slots.py`), runs chunks of decode steps for all live rows, streams what each row
produced, and retires finished rows.

What drafts is resolved from a `GenerationConfig` by `decode/drafting.py`, as for `Engine.generate`:
Medusa heads (with the heads directory's lookup chain), prompt lookup alone, or a draft model,
whose KV cache rows live beside the slots' (`slots.py`).

Adaptive speculation: each chunk runs one of the `choices`: plain decoding, cheaper drafters
(`drafters.cheaper_drafters`: the heads' tree without the lookup chain; their top guess alone
under a large tree) or the full drafter, whichever is predicted to emit the most tokens per second for the live
rows. Start-up compiles and times plain decoding first and serves it at once; the other programs
(prefill lengths, attention spans, drafting choices) compile in a background thread and join
the choices when ready. The step time of each (row bucket, choice, attention span) is measured
at start-up or on the program's first chunk, then kept as a running average of the chunks' own
times while serving. The tokens per step of each
drafter are the ones observed while serving, for greedy and for sampling rows apart; a chunk
expects the mean over its live rows. The losing choices still run now and then, in turn, to
refresh their estimates.
Greedy and seeded outputs do not depend on the choice (`coupled.py`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.decode.config import GenerationConfig
from medusa_jax.decode.drafters import cheaper_drafters
from medusa_jax.decode.drafting import SERVED, for_slots, resolve
from medusa_jax.decode.loaded import LoadedModel
from medusa_jax.errors import MedusaError
from medusa_jax.serve import slots as device
from medusa_jax.serve.metrics import Metrics

EXPLORE_EVERY = 32  # chunks of the winner before a losing choice refreshes its estimates (`Scheduler._choose`)


class QueueFull(MedusaError):
  """The server is at its queue limit; try again later."""


@dataclasses.dataclass
class Request:
  """One generation, filled in by the scheduler thread. `on_event(text_delta, finished)` is called
  from that thread whenever new text is final (and once with `finished=True`)."""

  prompt_ids: list[int]
  max_tokens: int
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False
  on_event: Callable[[str, bool], None] | None = None
  token_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ""                 # the final text so far (cut at a stop string)
  sent: int = 0                  # characters of `text` already streamed
  finish_reason: str | None = None
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  arrived: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_at: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)

  def cancel(self) -> None:
    self.cancelled.set()


@dataclasses.dataclass
class _Exploration:
  """Per row bucket: the choice the estimates favour, and when and which other one runs next."""
  winner: int                  # an index into `Scheduler.choices`
  since: int = 0               # chunks of the winner since a loser last ran
  every: int = EXPLORE_EVERY   # chunks of the winner before a loser runs again
  turn: int = 0                # which loser runs next (they take turns)


class Scheduler:
  """Serves `loaded` with `max_batch` slots of `max_context` tokens, drafting as `config` says
  (`drafting.resolve`: its mode, among medusa, lookup, draft, baseline and auto, and the drafting
  settings; each request brings its own sampling settings). `log` hears what start-up is doing."""

  def __init__(self, loaded: LoadedModel, config: GenerationConfig | None = None, *, max_batch: int = 8,
               max_context: int = 2048, chunk_steps: int = 4, max_queue: int = 256,
               metrics: Metrics | None = None, log: Callable[[str], None] = lambda _: None):
    if max_batch < 1 or chunk_steps < 1:
      raise MedusaError("max_batch and chunk_steps must be at least 1")
    self.loaded = loaded
    # rows sample by their own settings (`coupled.py`), so drafts are the drafter's greedy ones
    plan = resolve((config or GenerationConfig()).replace(temperature=0.0), loaded, modes=SERVED)
    self.mode, self.drafter, self.params = plan.mode, for_slots(plan.drafter, chunk_steps), plan.params
    self.tree = None if self.drafter is None else self.drafter.tree  # the largest a step verifies
    # what a chunk runs, cheapest first: plain decoding (None), cheaper drafters, the drafter
    self.choices = (None,) if self.drafter is None else (None, *cheaper_drafters(self.drafter), self.drafter)
    self.names = tuple("plain" if d is None else f"tree{d.tree.size}" for d in self.choices)
    self.max_batch, self.chunk_steps, self.max_queue = max_batch, chunk_steps, max_queue
    # a tree chunk writes up to the tree past a row's length; a draft model's catch-up, chunk_steps
    self.slack = 1 if self.tree is None else max(self.tree.size, chunk_steps)
    self.max_len = -(-(max_context + self.slack) // 64) * 64
    self.max_context = max_context
    self.buckets = sorted({min(max_batch, 1 << i) for i in range(max_batch.bit_length() + 1)})
    # prompt lengths prefill compiles for: 32, 48, 64, 96, ... (a third padding at most), up to the context
    sizes = sorted({s << i for s in (32, 48) for i in range(16)})
    self.prompt_buckets = [s for s in sizes if s < max_context] + [max_context]
    # attention spans (compiled once each): powers of 4 from 256 up to half the cache, and the whole
    # cache (a span near the whole cache saves little attention and costs a copy of the cache's rows)
    self.spans = sorted({s for s in (256 << 2 * i for i in range(8)) if 2 * s <= self.max_len} | {self.max_len})
    self.step_seconds: dict[tuple[int, int, int], float] = {}  # (bucket, choice, span) -> seconds per step
    # tokens per step of each drafting choice, observed for greedy (False) and sampling (True) rows
    # (a prior until its first chunk, whose rate replaces it)
    self.tokens_per_step = {(c, sampled): (d.tree.depth + 2) / 2 for c, d in enumerate(self.choices)
                            if d is not None for sampled in (False, True)}
    self._observed: set[tuple[int, bool]] = set()
    self.metrics = metrics or Metrics()
    self._queue: queue.Queue[Request] = queue.Queue()
    self._live: list[Request | None] = [None] * max_batch
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._slots = None
    self._exploration = {b: _Exploration(len(self.choices) - 1) for b in self.buckets}
    # every program serving may run, in the order they compile: prefill buckets, plain chunks, then
    # each drafting choice (cheapest first); `warm_up` compiles the first few, `compile_rest` the others
    self._all_programs = ([("insert", p) for p in self.prompt_buckets] +
                          [(b, c, span) for c in range(len(self.choices)) for b in self.buckets
                           for span in reversed(self.spans)])
    self._programs: dict[tuple, object] = {}
    self._shapes = None  # the slots' shapes, which every program is compiled for
    self._compiler: threading.Thread | None = None
    self.log = log
    self.ready = False

  # ---- start-up ---------------------------------------------------------------------------------

  def _compile(self, key: tuple):
    """The program of `key`, ("insert", prompt bucket) or (row bucket, choice, span), compiled for
    the slots' shapes."""
    e = self.loaded
    if key[0] == "insert":
      scalar = jax.ShapeDtypeStruct((), jnp.int32)
      args = (e.state, self.params, self._shapes, scalar, jax.ShapeDtypeStruct((1, key[1]), jnp.int32), scalar,
              jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
              jax.ShapeDtypeStruct((), jnp.uint32), scalar, jax.ShapeDtypeStruct((), jnp.bool_), e.eos_ids)
      return device.insert.lower(*args, graphdef=e.graphdef, drafter=self.drafter).compile()
    b, c, span = key
    drafter = self.choices[c]
    static = dict(graphdef=e.graphdef, drafter=drafter or self.drafter, bucket=b, steps=self.chunk_steps,
                  span=span, plain=drafter is None)
    return device.run_chunk.lower(e.state, self.params, self._shapes, e.eos_ids, **static).compile()

  def _program(self, key: tuple):
    """The compiled program of `key` (compiled now if the background has not yet)."""
    program = self._programs.get(key)
    if program is None:
      program = self._programs.setdefault(key, self._compile(key))
      self._report_compiled()
    return program

  def _run(self, key: tuple, *args):
    """Runs the compiled program of `key` on the weights, the drafter's params and `args`, each of
    `args` placed as the program takes it (on a mesh, arrays made outside a program are moved to
    its shardings; the weights and params were placed once, when loaded)."""
    program = self._program(key)
    args = jax.tree.map(lambda x, want: x if x.sharding == want else jax.device_put(x, want), args,
                        program.input_shardings[0][2:])
    return program(self.loaded.state, self.params, *args)

  def _available(self, key: tuple[int, int, int]) -> bool:
    return key in self._programs or key in self.step_seconds

  def _report_compiled(self) -> None:
    self.metrics.compiled_programs.labels("ready").set(len(self._programs))
    self.metrics.compiled_programs.labels("total").set(len(self._all_programs))

  def _ready_choices(self) -> list[str]:
    """The choices compiled for every row bucket (at one span at least)."""
    return [n for c, n in enumerate(self.names)
            if all(any((b, c, s) in self._programs for s in self.spans) for b in self.buckets)]

  @property
  def compiled(self) -> dict:
    """What is compiled: programs done and in all, and the choices ready for every row bucket."""
    return {"programs": len(self._programs), "total": len(self._all_programs), "choices": self._ready_choices()}

  def _chunk(self, slots, c: int, b: int, span: int) -> device.Chunk:
    e = self.loaded
    return device.Chunk(*self._run((b, c, span), slots, e.eos_ids))

  def _empty_slots(self):
    e = self.loaded
    draft = None if self.drafter is None else self.drafter.empty(self.params, e.model, self.max_batch, self.max_len,
                                                                 e.dtype, e.mesh)
    return device.Slots.init(e.config, self.max_batch, self.max_len, e.dtype, e.mesh, draft)

  def _prompt_bucket(self, n: int) -> int:
    return next(p for p in self.prompt_buckets if p >= n)

  def _span(self, b: int, c: int) -> int | None:
    """The positions the next chunk of choice `c` attends to: of the compiled `spans` that hold the
    longest live row plus what the chunk writes (a drafting chunk: each step's tree; a plain one: a
    token a step, and as many for a draft model's catch-up), the one with the shortest step time
    (one not measured yet first, so it gets measured); None: none is compiled yet."""
    longest = max(len(r.prompt_ids) + len(r.token_ids) for r in self._live[:b] if r is not None)
    d = self.choices[c]
    writes = self.chunk_steps + 1 if d is None else self.chunk_steps * (d.tree.depth + 1) + d.tree.size
    fits = [s for s in self.spans if s >= longest + writes and self._available((b, c, s))]
    return min(fits, key=lambda s: (self.step_seconds.get((b, c, s), 0.0), s), default=None)

  def warm_up(self) -> None:
    """What serving needs first: plain chunks over the whole cache for every row bucket (timed,
    best of 3, with every row live a quarter into the context), prefill of the shortest prompts
    and of those, and the row moves. The other programs (prefill buckets, spans, drafting
    choices) compile afterwards in the background (`compile_rest`) and join the choices as they
    are ready; a request whose prompt bucket is not compiled yet compiles it."""
    e = self.loaded
    slots = self._empty_slots()
    self._shapes = jax.tree.map(  # placed where a mesh placed them; the others wherever programs put them
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None), slots)
    prompt = [min(e.pad_id + 3, e.config.vocab_size - 1)] * max(1, self.max_context // 4)
    self.log(f"compiling plain decoding for {self.max_batch} slots of {self.max_context} tokens "
             f"({len(self.buckets)} row buckets) ...")
    begin = time.perf_counter()
    slots = self._insert(slots, 0, prompt[:1], self.prompt_buckets[0], budget=1).slots
    for i in range(self.max_batch):
      slots = self._insert(slots, i, prompt, self._prompt_bucket(len(prompt)),
                           budget=self.max_context - len(prompt), stop_on_eos=False).slots
    placed = jax.tree.map(jnp.copy, (slots.cache.lengths, slots.budget, slots.done))

    def rewound(rows):  # what the chunks wrote past the rows' lengths is never read
      lengths, budget, done = jax.tree.map(jnp.copy, placed)  # fresh buffers: a chunk donates its own
      return dataclasses.replace(rows, cache=dataclasses.replace(rows.cache, lengths=lengths), budget=budget,
                                 done=done)

    for b in self.buckets:
      slots, tokens, _ = self._chunk(rewound(slots), 0, b, self.max_len)  # compiles
      jax.block_until_ready(tokens)
      best = float("inf")
      for _ in range(3):
        slots = rewound(slots)
        start = time.perf_counter()
        slots, tokens, _ = self._chunk(slots, 0, b, self.max_len)
        jax.block_until_ready(tokens)
        best = min(best, time.perf_counter() - start)
      self._set_step_seconds((b, 0, self.max_len), best / self.chunk_steps)
    jax.block_until_ready(device.free_row(device.move_row(slots, jnp.int32(1 % self.max_batch), jnp.int32(0)),
                                          jnp.int32(0)))
    self._slots = self._empty_slots()
    self.ready = True
    self.log(f"ready in {time.perf_counter() - begin:.1f} s: serving plain decoding; "
             f"{len(self._all_programs) - len(self._programs)} more programs compile in the background")

  def compile_rest(self) -> None:
    """Compiles every program not compiled yet (prefill buckets, shorter spans, then each drafting
    choice, cheapest first), each joining the scheduler's choices when ready; logs its progress."""
    begin = time.perf_counter()
    ready = set(self._ready_choices())
    for key in self._all_programs:
      if self._stop.is_set():
        return
      if key not in self._programs:
        self._program(key)
        for name in self._ready_choices():
          if name not in ready:
            ready.add(name)
            self.log(f"{name} ready for every row bucket ({len(self._programs)} of {len(self._all_programs)} "
                     f"programs, {time.perf_counter() - begin:.1f} s)")
    self.log(f"all {len(self._all_programs)} programs compiled in {time.perf_counter() - begin:.1f} s")

  def _insert(self, slots, slot: int, ids: list[int], length: int, *, budget: int, temperature=0.0,
              top_p=1.0, seed=0, stop_on_eos=True) -> device.Inserted:
    e = self.loaded
    tokens = np.full((1, length), e.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    return device.Inserted(*self._run(
        ("insert", length), slots, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(len(ids)),
        jnp.float32(temperature), jnp.float32(top_p), jnp.uint32(seed % (1 << 32)), jnp.int32(budget),
        jnp.bool_(stop_on_eos), e.eos_ids))

  def start(self, compile_rest: bool = True) -> None:
    """Compiles what serving needs first (`warm_up`), starts serving, and compiles the rest in the
    background (unless `compile_rest` is false)."""
    if not self.ready:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="medusa-scheduler", daemon=True)
    self._thread.start()
    if compile_rest:
      self._compiler = threading.Thread(target=self.compile_rest, name="medusa-compile", daemon=True)
      self._compiler.start()

  # ---- requests ---------------------------------------------------------------------------------

  def check(self, prompt_ids: list[int], max_tokens: int) -> None:
    """A one-line error for a request that cannot be served."""
    if not prompt_ids:
      raise MedusaError("the prompt is empty")
    if max_tokens < 1:
      raise MedusaError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(prompt_ids) + max_tokens > self.max_context:
      raise MedusaError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                        f"the context of {self.max_context} tokens")

  def submit(self, request: Request) -> None:
    self.check(request.prompt_ids, request.max_tokens)
    if self._stop.is_set():
      raise QueueFull("the server is shutting down")
    if self._queue.qsize() >= self.max_queue:
      raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
    self.metrics.prompt_tokens.inc(len(request.prompt_ids))
    self._queue.put(request)
    self._wake.set()

  def shutdown(self, timeout: float = 30.0) -> None:
    """Stops admitting; lets live requests finish for up to `timeout` seconds, then cancels them
    (and every queued one)."""
    self._stop.set()
    self._wake.set()
    deadline = time.perf_counter() + timeout
    while self._thread is not None and self._thread.is_alive() and any(self._live) \
        and time.perf_counter() < deadline:
      time.sleep(0.05)
    for r in self._live:
      if r is not None:
        r.cancel()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    while not self._queue.empty():
      self._finish(self._queue.get_nowait(), "cancelled")

  # ---- the loop ---------------------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      self._retire_cancelled()
      if not self._stop.is_set():
        self._admit()
      live = sum(r is not None for r in self._live)
      self.metrics.active_rows.set(live)
      self.metrics.queue_depth.set(self._queue.qsize())
      if not live:
        if self._stop.is_set():
          return
        self._wake.wait(0.05)
        self._wake.clear()
        continue
      b = next(b for b in self.buckets if b >= live)
      c, span = self._choose(b)
      jax.block_until_ready(self._slots)  # the chunk's time is its own, not the row moves' before it
      start = time.perf_counter()
      self._slots, tokens, counts = self._chunk(self._slots, c, b, span)
      tokens, counts, done = jax.device_get((tokens, counts, self._slots.done[:b]))
      now = time.perf_counter()
      self._observe_time((b, c, span), (now - start) / self.chunk_steps)
      self.metrics.chunks.labels(self.names[c]).inc()
      if self.choices[c] is not None:
        self._observe_tokens(c, counts)
      for i in range(b):
        r = self._live[i]
        if r is not None:
          self._deliver(r, [int(t) for t in tokens[i, : counts[i]]], now)
          if r.finish_reason is None and done[i]:
            self._finish(r, "length" if len(r.token_ids) >= r.max_tokens else "stop")
      for i in range(b - 1, -1, -1):  # highest first: `_free` moves the last live row down
        if self._live[i] is not None and self._live[i].finish_reason is not None:
          self._free(i)

  def _observe_tokens(self, c: int, counts: np.ndarray) -> None:
    """Updates the tokens per step of drafting choice `c`, for greedy and for sampling rows, from
    a chunk of it (`counts`: the tokens of each row; rows that were live and ran): its rate
    replaces the prior, then joins a running average."""
    for sampled in (False, True):
      ran = [int(n) for r, n in zip(self._live, counts) if r is not None and n > 0 and (r.temperature > 0) == sampled]
      if ran:
        rate = sum(ran) / (len(ran) * self.chunk_steps)
        old = self.tokens_per_step[c, sampled] if (c, sampled) in self._observed else rate
        self.tokens_per_step[c, sampled] = 0.8 * old + 0.2 * rate
        self._observed.add((c, sampled))
    self.metrics.accepted_tokens_per_step.labels(self.names[c]).set(self._expected_tokens(c, len(self._live)))

  def _expected_tokens(self, c: int, b: int) -> float:
    """Tokens per step of choice `c` expected from the live rows among the first `b` slots."""
    if self.choices[c] is None:
      return 1.0
    live = [r for r in self._live[:b] if r is not None]
    return sum(self.tokens_per_step[c, r.temperature > 0] for r in live) / max(1, len(live))

  def _observe_time(self, key: tuple[int, int, int], seconds: float) -> None:
    """Folds a chunk's seconds per step into the running average of its (bucket, choice, span) (the
    first chunk of a program compiled in the background sets it); a time over twice the average (a
    pause on the host) counts as twice."""
    old = self.step_seconds.get(key, seconds)
    self._set_step_seconds(key, 0.8 * old + 0.2 * min(seconds, 2 * old))

  def _set_step_seconds(self, key: tuple[int, int, int], seconds: float) -> None:
    b, c, span = key
    self.step_seconds[key] = seconds
    self.metrics.step_seconds.labels(str(b), self.names[c], str(span)).set(seconds)

  def _choose(self, b: int) -> tuple[int, int]:
    """The choice the next chunk of `b` rows runs, and its span: the one with the most predicted
    tokens/s (ties to the larger). The losing choices still run now and then, in turn, to refresh
    their estimates: after 32 chunks of the winner (counted per row bucket), then twice as many
    each time up to 256, and after 32 again once the winner changes."""
    spans = [self._span(b, c) for c in range(len(self.choices))]
    ready = [c for c in range(len(self.choices)) if spans[c] is not None]
    fresh = [c for c in ready if (b, c, spans[c]) not in self.step_seconds]
    if fresh:  # compiled in the background and not yet measured: measure it on this chunk
      return fresh[0], spans[fresh[0]]
    rates = {c: self._expected_tokens(c, b) / self.step_seconds[(b, c, spans[c])] for c in ready}
    winner = max(ready, key=lambda c: (rates[c], c))
    e = self._exploration[b]
    if winner != e.winner:
      e.winner, e.since, e.every, e.turn = winner, 0, EXPLORE_EVERY, 0
    if e.since >= e.every and len(ready) > 1:
      e.since, e.every = 0, min(2 * e.every, 8 * EXPLORE_EVERY)
      losers = [c for c in ready if c != winner]
      loser, e.turn = losers[e.turn % len(losers)], e.turn + 1
      return loser, spans[loser]
    e.since += 1
    return winner, spans[winner]

  def _admit(self) -> None:
    while not self._queue.empty():
      free = next((i for i, r in enumerate(self._live) if r is None), None)
      if free is None:
        return
      r = self._queue.get_nowait()
      if r.cancelled.is_set():
        self._finish(r, "cancelled")
        continue
      self._slots, first, done = self._insert(
          self._slots, free, r.prompt_ids, self._prompt_bucket(len(r.prompt_ids)), budget=r.max_tokens,
          temperature=r.temperature, top_p=r.top_p, seed=r.seed, stop_on_eos=not r.ignore_eos)
      self._live[free] = r
      first, done = jax.device_get((first, done))
      self._deliver(r, [int(first)], time.perf_counter())
      if r.finish_reason is None and done:
        self._finish(r, "length" if len(r.token_ids) >= r.max_tokens else "stop")
      if r.finish_reason is not None:
        self._free(free)

  def _deliver(self, r: Request, new: list[int], now: float) -> None:
    """Appends new tokens, streams the text that is final (held back: an unfinished character, or
    what could still become a stop string) and finishes at a stop string."""
    if not new or r.finish_reason is not None:
      return
    if r.first_token_at is None:
      r.first_token_at = now
      self.metrics.ttft.observe(now - r.arrived)
    else:
      for _ in new:
        self.metrics.itl.observe((now - r.token_times[-1]) / len(new))
    r.token_times.append(now)
    r.token_ids.extend(new)
    self.metrics.completion_tokens.inc(len(new))
    text = self.loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
    if cut >= 0:
      r.text = text[:cut]
      self._finish(r, "stop")
      return
    r.text = text
    hold = max((len(s) - 1 for s in r.stop), default=0)
    final = len(text) - hold
    while final > r.sent and text[final - 1] == "\ufffd":
      final -= 1
    if final > r.sent and r.on_event is not None:
      r.on_event(text[r.sent: final], False)
    r.sent = max(r.sent, final)

  def _finish(self, r: Request, reason: str) -> None:
    if r.finish_reason is not None:
      return
    r.finish_reason = reason
    if r.on_event is not None:
      r.on_event(r.text[r.sent:], True)
    r.sent = len(r.text)

  def _free(self, i: int) -> None:
    """Frees slot i, moving the last live row into it so live rows stay in the first slots."""
    self._live[i] = None
    last = max((j for j, r in enumerate(self._live) if r is not None), default=-1)
    if last > i:
      self._slots = device.move_row(self._slots, jnp.int32(last), jnp.int32(i))
      self._live[i], self._live[last] = self._live[last], None
    else:
      self._slots = device.free_row(self._slots, jnp.int32(i))

  def _retire_cancelled(self) -> None:
    for i in range(len(self._live) - 1, -1, -1):
      r = self._live[i]
      if r is not None and r.cancelled.is_set():
        self._finish(r, "cancelled")
        self._free(i)
