"""Beam search of the base model, plain or speculative: one jitted `jax.lax.while_loop`, static
`[batch, beams]` shapes, the KV cache's rows (batch x beams) reordered by beam.

The rule is transformers' (`generate(num_beams=W, do_sample=False)`), so the two return the same
sequences. Each step, per prompt: the running beams' accumulated log-probabilities plus the next
token's give `W * vocab` candidates; the best `K = max(2, 1 + #eos) * W` are kept. Candidates
that end in EOS (or reach `max_new_tokens`) and rank among the first W are finished hypotheses,
scored `sum_logprob / generated_length ** length_penalty` and merged into the W best finished
ones; the W best candidates that did not end become the next running beams. A prompt stops
taking hypotheses once W are finished and (`early_stopping`): True: at once; False: the best
running beam, scored at its current length, cannot beat the worst finished one; "never": the
same at the longest length when `length_penalty > 0`. Frozen prompts wait for the others.

Speculative beam search (`speculative_beam_generate`) takes those very steps, several per forward:
each running beam drafts the heads' tree from its last token, one forward verifies every beam's
tree, and the beam steps run on from the tree's logits for as long as every beam a prompt keeps is
a node of the tree it came from (so its next-token logits are known); the first step that keeps
a beam outside its tree ends the prompt's steps for this forward, and that beam's token is the
next root. Each step reads the logits plain beam search would, so the result is the same.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.drafters import DraftContext, Drafter
from medusa_jax.decode.plain import Prefilled, prefill
from medusa_jax.decode.speculative import tree_forward
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama

NEG = -1.0e9  # transformers' "impossible" score, added (not assigned) as it does


@dataclasses.dataclass(frozen=True)
class BeamParams:
  """Beam search settings (a static jit argument; defaults in `GenerationConfig`)."""

  num_beams: int
  length_penalty: float = 1.0
  early_stopping: bool | str = False  # True, False or "never"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamOutput:
  tokens: jax.Array      # `[batch, beams, max_new_tokens]` finished hypotheses, best first; `pad` after each
  num_tokens: jax.Array  # `[batch, beams]` their lengths (EOS included)
  scores: jax.Array      # `[batch, beams]` length-penalised log-probabilities
  steps: jax.Array       # `[]` forward passes, the prefill included


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Beams:
  tokens: jax.Array  # `[batch, W, max_new_tokens]`
  scores: jax.Array  # `[batch, W]`
  length: jax.Array  # `[batch, W]`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
  """One search per prompt: its running beams and finished hypotheses."""

  running: _Beams
  finished: _Beams
  is_finished: jax.Array  # `[batch, W]` which finished slots hold a hypothesis
  improvable: jax.Array   # `[batch]` transformers' `is_early_stop_heuristic_unsatisfied`
  step: jax.Array         # `[batch]` tokens each running beam holds

  @classmethod
  def init(cls, batch: int, width: int, max_new_tokens: int, pad_id: int) -> BeamState:
    empty = jnp.full((batch, width, max_new_tokens), pad_id, jnp.int32)
    zeros = jnp.zeros((batch, width), jnp.int32)
    first = jnp.broadcast_to(jnp.where(jnp.arange(width) == 0, 0.0, NEG), (batch, width))  # one live beam
    return cls(_Beams(empty, first, zeros), _Beams(empty, jnp.full((batch, width), NEG), zeros),
               zeros.astype(bool), jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32))

  def done(self, params: BeamParams, max_new_tokens: int) -> jax.Array:
    """`[batch]` prompts whose hypotheses can no longer change."""
    full = jnp.all(self.is_finished, axis=1) & (params.early_stopping is True)
    return ~self.improvable | full | (self.step >= max_new_tokens)

  def output(self, steps: jax.Array) -> BeamOutput:
    return BeamOutput(self.finished.tokens, self.finished.length, self.finished.scores, steps)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x` `[batch, n, ...]`, `index` `[batch, k]` -> `[batch, k, ...]`."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class BeamStep(NamedTuple):
  state: BeamState
  source: jax.Array  # `[batch, W]` the beam each new running beam extends
  token: jax.Array   # `[batch, W]` the token it adds


def beam_step(s: BeamState, logits: jax.Array, eos_ids: jax.Array, params: BeamParams,
              max_new_tokens: int) -> BeamStep:
  """One step of every prompt's search from the running beams' next-token logits `[batch, W,
  vocab]`."""
  batch, w, vocab = logits.shape
  keep = max(2, 1 + eos_ids.shape[0]) * w
  scores = jax.nn.log_softmax(logits, axis=-1) + s.running.scores[..., None]
  top_scores, top = jax.lax.top_k(scores.reshape(batch, w * vocab), keep)  # [b, K]
  source, token = top // vocab, (top % vocab).astype(jnp.int32)
  at_step = (jnp.arange(max_new_tokens) == s.step[:, None])[:, None, :]
  seqs = jnp.where(at_step, token[..., None], _take(s.running.tokens, source))  # [b, K, N]
  length = (s.step + 1)[:, None]
  ends = jnp.isin(token, eos_ids) | (length >= max_new_tokens)

  run_scores, run = jax.lax.top_k(top_scores + ends * NEG, w)
  running = _Beams(_take(seqs, run), run_scores, jnp.broadcast_to(length, (batch, w)))

  just_finished = ends & (jnp.arange(keep) < w)[None, :]
  penalised = top_scores / length.astype(jnp.float32) ** params.length_penalty
  full = jnp.all(s.is_finished, axis=1, keepdims=True) & (params.early_stopping is True)
  penalised = penalised + full * NEG + (~s.improvable[:, None]) * NEG + (~just_finished) * NEG
  best_scores, best = jax.lax.top_k(jnp.concatenate([s.finished.scores, penalised], axis=1), w)
  finished = _Beams(_take(jnp.concatenate([s.finished.tokens, seqs], axis=1), best), best_scores,
                    _take(jnp.concatenate([s.finished.length, jnp.broadcast_to(length, (batch, keep))], 1), best))
  is_finished = _take(jnp.concatenate([s.is_finished, just_finished], axis=1), best)

  if params.early_stopping == "never" and params.length_penalty > 0:
    best_length = jnp.full((batch,), float(max_new_tokens))
  else:
    best_length = (s.step + 1).astype(jnp.float32)
  best_possible = running.scores[:, 0] / best_length ** params.length_penalty
  worst = jnp.where(is_finished, jnp.min(finished.scores, axis=1, keepdims=True), NEG)
  improvable = s.improvable & jnp.any(best_possible[:, None] > worst, axis=1)
  state = BeamState(running, finished, is_finished, improvable, s.step + 1)
  return BeamStep(state, _take(source, run), _take(token, run))


def _start(model: Llama, tokens, prompt_lens, width: int, cache_len: int, cache_dtype, mesh) -> Prefilled:
  """Prefill, then each prompt's cache row repeated for its W beams: logits `[batch, W, vocab]`,
  hidden `[batch * W, embed]`."""
  cache = KVCache.init(model.config, tokens.shape[0], cache_len, cache_dtype, mesh)
  logits, hidden, cache, _ = prefill(model, tokens, prompt_lens, cache)
  rows = jnp.repeat(jnp.arange(tokens.shape[0]), width)
  return Prefilled(jnp.repeat(logits[:, None], width, axis=1), hidden[rows], cache.take_rows(rows))


def _rows(local: jax.Array) -> jax.Array:
  """Beam indices within each prompt `[batch, W]` -> cache rows `[batch * W]`."""
  return (jnp.arange(local.shape[0])[:, None] * local.shape[1] + local).reshape(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache     # `batch * W` rows, beam-major within a prompt
  logits: jax.Array  # `[batch, W, vocab]` next-token logits of the running beams
  state: BeamState


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens", "cache_len", "pad_id",
                                             "cache_dtype", "mesh"))
def beam_generate(state: nnx.State, tokens: jax.Array, prompt_lens: jax.Array, eos_ids: jax.Array, *,
                  graphdef: nnx.GraphDef, params: BeamParams, max_new_tokens: int, cache_len: int,
                  pad_id: int, cache_dtype=jnp.float32, mesh: Mesh | None = None) -> BeamOutput:
  """Beam search over right-padded prompts `[batch, P]` (lengths `prompt_lens`). `cache_len` must
  be at least P + max_new_tokens."""
  model = nnx.merge(graphdef, state)
  batch, w = tokens.shape[0], params.num_beams
  logits, _, cache, _ = _start(model, tokens, prompt_lens, w, cache_len, cache_dtype, mesh)

  def body(c: _Carry) -> _Carry:
    s, source, token = beam_step(c.state, c.logits, eos_ids, params, max_new_tokens)

    def forward(cache):  # the new beams' next-token logits (not after the last step)
      last = token.reshape(-1)
      logits, _, cache = model(last[:, None], cache.lengths[:, None], cache.take_rows(_rows(source)))
      return logits[:, 0].reshape(c.logits.shape), cache.advance(jnp.ones_like(last))

    logits, cache = jax.lax.cond(jnp.all(s.done(params, max_new_tokens)), lambda cache: (c.logits, cache),
                                 forward, c.cache)
    return _Carry(cache, logits, s)

  end = jax.lax.while_loop(lambda c: ~jnp.all(c.state.done(params, max_new_tokens)), body,
                           _Carry(cache, logits, BeamState.init(batch, w, max_new_tokens, pad_id)))
  return end.state.output(jnp.max(end.state.step))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SpecCarry:
  cache: KVCache
  root: jax.Array    # `[batch * W]` each beam's last token (not in the cache yet)
  hidden: jax.Array  # `[batch * W, embed]` the hidden state before it
  state: BeamState
  forwards: jax.Array


def _where_rows(keep: jax.Array, new, old):
  """Per prompt (`keep` `[batch]`), `new`'s entries else `old`'s (pytrees of `[batch, ...]`)."""
  return jax.tree.map(lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


@functools.partial(jax.jit, static_argnames=("graphdef", "drafter", "params", "max_new_tokens", "cache_len",
                                             "pad_id", "cache_dtype", "mesh"))
def speculative_beam_generate(state: nnx.State, draft_params, tokens: jax.Array, prompt_lens: jax.Array,
                              eos_ids: jax.Array, *, graphdef: nnx.GraphDef, drafter: Drafter,
                              params: BeamParams, max_new_tokens: int, cache_len: int, pad_id: int,
                              cache_dtype=jnp.float32, mesh: Mesh | None = None) -> BeamOutput:
  """`beam_generate`'s result with fewer forwards: every beam drafts a tree after its last token
  (a stateless `drafter` reading no history: the heads, with a static or per-step tree; its
  `draft_params`) and one forward verifies them all (module docstring). `cache_len` must be at
  least P + max_new_tokens + drafter.tree.size."""
  model = nnx.merge(graphdef, state)
  batch, w, tree = tokens.shape[0], params.num_beams, drafter.tree
  logits, hidden, cache, _ = _start(model, tokens, prompt_lens, w, cache_len, cache_dtype, mesh)
  s, source, token = beam_step(BeamState.init(batch, w, max_new_tokens, pad_id), logits, eos_ids, params,
                               max_new_tokens)
  rows = _rows(source)

  def body(c: _SpecCarry) -> _SpecCarry:
    proposal = drafter.propose(draft_params, model, DraftContext.without_history(c.root, c.hidden), None, None)
    drafted = proposal.tokens  # [b * W, T]
    arrays = tree.arrays(batch * w) if proposal.tree is None else proposal.tree
    fwd = tree_forward(model, c.cache, drafted, arrays)
    node_logits, node_hidden, cache = fwd.logits, fwd.hidden, fwd.cache
    beam = jnp.broadcast_to(jnp.arange(w), (batch, w))  # each beam's source row within its prompt
    node = jnp.zeros((batch, w), jnp.int32)             # the node whose logits it continues from
    path = jnp.zeros((batch, w, tree.depth + 1), jnp.int32)  # nodes it keeps, root first
    active = ~c.state.done(params, max_new_tokens)
    s, took_steps = c.state, active
    kept = (beam, node, path, c.root.reshape(batch, w))  # for prompts that take no step
    for d in range(tree.depth + 1):
      row = _rows(beam)
      step_logits = node_logits[row, node.reshape(-1)].reshape(batch, w, -1)
      new, source, token = beam_step(s, step_logits, eos_ids, params, max_new_tokens)
      s = _where_rows(active, new, s)
      beam, node, path = _take(beam, source), _take(node, source), _take(path, source)
      candidates = drafted[_rows(beam)].reshape(batch, w, -1)  # [b, W, T]
      parents = arrays.parents[_rows(beam)].reshape(batch, w, -1)
      child = (parents == node[..., None]) & (candidates == token[..., None])
      go_on = active & jnp.all(jnp.any(child, axis=-1), axis=1) & ~new.done(params, max_new_tokens)
      go_on = go_on & (d < tree.depth)
      stop = active & ~go_on
      kept = _where_rows(stop, (beam, node, path, token), kept)
      node = jnp.argmax(child, axis=-1).astype(jnp.int32)
      if d < tree.depth:
        path = path.at[:, :, d + 1].set(node)
      active = go_on
    beam, node, path, root = kept
    row = _rows(beam)
    count = jnp.where(took_steps.repeat(w), arrays.depths[row, node.reshape(-1)] + 1, 0)
    moved = cache.take_rows(row).commit_path(path.reshape(batch * w, -1), count)
    return _SpecCarry(moved, root.reshape(-1), node_hidden[row, node.reshape(-1)], s, c.forwards + 1)

  start = _SpecCarry(cache.take_rows(rows), token.reshape(-1), hidden[rows], s, jnp.int32(1))
  end = jax.lax.while_loop(lambda c: ~jnp.all(c.state.done(params, max_new_tokens)), body, start)
  return end.state.output(end.forwards)

