"""The host side of continuous batching: a queue of requests, a thread that admits them into free
slots (`decode/slots.py`), runs chunks of decode steps for all live rows, streams what each row
produced, and retires finished rows.

What drafts (`mode`): Medusa heads (with the heads directory's lookup chain), prompt lookup alone,
or a draft model, whose KV cache rows live beside the slots' (`decode/slots.py`).

Adaptive speculation: each chunk runs one of the `choices`: plain decoding, cheaper drafters
(`drafters.cheaper_drafters`: the heads' tree without the lookup chain; their top guess alone
under a large tree) or the full drafter, whichever is predicted to emit the most tokens per second for the live
rows. The step time of each (row bucket, choice, attention span) is measured at start-up, then
kept as a running average of the chunks' own times while serving. The tokens per step of each
drafter are the ones observed while serving, for greedy and for sampling rows apart; a chunk
expects the mean over its live rows. The losing choices still run now and then, in turn, to
refresh their estimates.
Greedy and seeded outputs do not depend on the choice (`decode/coupled.py`).
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

from medusa_jax.decode import slots as device
from medusa_jax.decode.config import GenerationConfig
from medusa_jax.decode.drafters import cheaper_drafters
from medusa_jax.decode.engine import Engine
from medusa_jax.errors import MedusaError
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
  """Serves `engine` with `max_batch` slots of `max_context` tokens, drafting as `mode` says:
  "medusa" (its heads and tree, with a lookup chain of `lookup` tokens: None takes the heads
  directory's, gated by `min_ngram` as in `GenerationConfig`), "lookup" (prompt lookup alone, a
  chain of `lookup` tokens), "draft" (its draft model: a chain of `draft_tokens`, or the
  `draft_tree` of its top-k tokens), "baseline" (plain only), or "auto": medusa when heads are
  loaded, else lookup when `lookup` is given, else baseline."""

  def __init__(self, engine: Engine, *, max_batch: int = 8, max_context: int = 2048, chunk_steps: int = 4,
               max_queue: int = 256, metrics: Metrics | None = None, mode: str = "auto",
               lookup: int | None = None, min_ngram: int | None = None, draft_tokens: int | None = None,
               draft_tree: str | None = None):
    if max_batch < 1 or chunk_steps < 1:
      raise MedusaError("max_batch and chunk_steps must be at least 1")
    self.engine = engine
    given = dict(min_ngram=min_ngram, draft_tokens=draft_tokens, draft_tree=draft_tree)
    config = GenerationConfig().replace(lookup=lookup, **{k: v for k, v in given.items() if v is not None})
    if mode == "auto":
      mode = "medusa" if engine.heads_graphdef is not None else "lookup" if lookup else "baseline"
    mode = engine.resolve_mode(mode)
    if mode not in ("medusa", "lookup", "draft", "baseline"):
      raise MedusaError(f"the server does not serve mode {mode!r}; use medusa, lookup, draft or baseline")
    if mode == "lookup" and lookup:
      config = config.replace(draft_tokens=lookup)
    self.drafter, self.params = (None, None) if mode == "baseline" else engine.drafter(mode, config)
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
    self.ready = False

  # ---- start-up ---------------------------------------------------------------------------------

  def _chunk(self, slots, c: int, b: int, span: int | None = None):
    e, drafter = self.engine, self.choices[c]
    return device.run_chunk(e.state, self.params, slots, e.eos_ids, graphdef=e.graphdef,
                            drafter=drafter or self.drafter, bucket=b, steps=self.chunk_steps, span=span,
                            plain=drafter is None)

  def _empty_slots(self):
    e = self.engine
    draft = None if self.drafter is None else self.drafter.empty(self.params, e.model, self.max_batch, self.max_len,
                                                                 e.dtype, e.mesh)
    return device.Slots.init(e.config, self.max_batch, self.max_len, e.dtype, e.mesh, draft)

  def _prompt_bucket(self, n: int) -> int:
    return next(p for p in self.prompt_buckets if p >= n)

  def _span(self, b: int, c: int) -> int:
    """The positions the next chunk of choice `c` attends to: of the `spans` that hold the longest
    live row plus what the chunk writes (a drafting chunk: each step's tree; a plain one: a token a
    step, and as many for a draft model's catch-up), the one with the shortest step time (the
    smallest before any is measured)."""
    longest = max(len(r.prompt_ids) + len(r.token_ids) for r in self._live[:b] if r is not None)
    d = self.choices[c]
    writes = self.chunk_steps + 1 if d is None else self.chunk_steps * (d.tree.depth + 1) + d.tree.size
    fits = [s for s in self.spans if s >= longest + writes]
    return min(fits, key=lambda s: (self.step_seconds.get((b, c, s), 0.0), s))

  def warm_up(self) -> None:
    """Compiles every (row bucket, choice, span) chunk, the prompt buckets' prefill and the
    row moves, and times each chunk (best of 3) with every row live a quarter into the context
    (put back there before each: a drafting step's cost depends on what its drafts match, e.g.
    whether a gated lookup chain runs)."""
    e = self.engine
    slots = self._empty_slots()
    prompt = [min(e.pad_id + 3, e.config.vocab_size - 1)] * max(1, self.max_context // 4)
    for p in self.prompt_buckets:
      slots = self._insert(slots, 0, prompt[:p], p, budget=1)[0]
    for i in range(self.max_batch):
      slots = self._insert(slots, i, prompt, self._prompt_bucket(len(prompt)),
                           budget=self.max_context - len(prompt), stop_on_eos=False)[0]
    placed = jax.tree.map(jnp.copy, (slots.cache.lengths, slots.budget, slots.done))

    def rewound(rows):  # what the chunks wrote past the rows' lengths is never read
      lengths, budget, done = jax.tree.map(jnp.copy, placed)  # fresh buffers: a chunk donates its own
      return dataclasses.replace(rows, cache=dataclasses.replace(rows.cache, lengths=lengths), budget=budget,
                                 done=done)

    for b in self.buckets:
      for c in range(len(self.choices)):
        for span in self.spans:
          slots, tokens, _ = self._chunk(rewound(slots), c, b, span)  # compiles
          jax.block_until_ready(tokens)
          best = float("inf")
          for _ in range(3):
            slots = rewound(slots)
            begin = time.perf_counter()
            slots, tokens, _ = self._chunk(slots, c, b, span)
            jax.block_until_ready(tokens)
            best = min(best, time.perf_counter() - begin)
          self._set_step_seconds((b, c, span), best / self.chunk_steps)
    jax.block_until_ready(device.free_row(device.move_row(slots, jnp.int32(1 % self.max_batch), jnp.int32(0)),
                                          jnp.int32(0)))
    self._slots = self._empty_slots()
    self.ready = True

  def _insert(self, slots, slot: int, ids: list[int], length: int, *, budget: int, temperature=0.0,
              top_p=1.0, seed=0, stop_on_eos=True):
    e = self.engine
    tokens = np.full((1, length), e.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    return device.insert(e.state, self.params, slots, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(len(ids)),
                         jnp.float32(temperature), jnp.float32(top_p), jnp.uint32(seed % (1 << 32)),
                         jnp.int32(budget), jnp.bool_(stop_on_eos), e.eos_ids, graphdef=e.graphdef,
                         drafter=self.drafter)

  def start(self) -> None:
    if not self.ready:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="medusa-scheduler", daemon=True)
    self._thread.start()

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
    """Folds a chunk's seconds per step into the running average of its (bucket, choice, span); a
    time over twice the average (a pause on the host) counts as twice."""
    old = self.step_seconds[key]
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
    rates = [self._expected_tokens(c, b) / self.step_seconds[(b, c, spans[c])] for c in range(len(self.choices))]
    winner = max(range(len(rates)), key=lambda c: (rates[c], c))
    e = self._exploration[b]
    if winner != e.winner:
      e.winner, e.since, e.every, e.turn = winner, 0, EXPLORE_EVERY, 0
    if e.since >= e.every and len(self.choices) > 1:
      e.since, e.every = 0, min(2 * e.every, 8 * EXPLORE_EVERY)
      losers = [c for c in range(len(self.choices)) if c != winner]
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
    text = self.engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
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
