"""Beam search of the base model: one jitted `jax.lax.while_loop`, static `[batch, beams]` shapes,
the KV cache's rows (batch x beams) reordered by beam each step.

The rule is transformers' (`generate(num_beams=W, do_sample=False)`), so the two return the same
sequences. Each step, per prompt: the running beams' accumulated log-probabilities plus the next
token's give `W * vocab` candidates; the best `K = max(2, 1 + #eos) * W` are kept. Candidates
that end in EOS (or reach `max_new_tokens`) and rank among the first W are finished hypotheses,
scored `sum_logprob / generated_length ** length_penalty` and merged into the W best finished
ones; the W best candidates that did not end become the next running beams. A prompt stops
taking hypotheses once W are finished and (`early_stopping`): True: at once; False: the best
running beam, scored at its current length, cannot beat the worst finished one; "never": the
same at the longest length when `length_penalty > 0`. The loop ends when no prompt can improve.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.plain import prefill
from medusa_jax.model.kv_cache import KVCache

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
  length: jax.Array  # `[batch, W]` tokens in each (finished ones; running ones all have `step`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache       # `batch * W` rows, beam-major within a prompt
  logits: jax.Array    # `[batch, W, vocab]` next-token logits of the running beams
  running: _Beams
  finished: _Beams
  is_finished: jax.Array  # `[batch, W]` which finished slots hold a hypothesis
  improvable: jax.Array   # `[batch]` transformers' `is_early_stop_heuristic_unsatisfied`
  step: jax.Array         # `[]` tokens each running beam holds
  go_on: jax.Array        # `[]`


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x` `[batch, n, ...]`, `index` `[batch, k]` -> `[batch, k, ...]`."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_step(c: _Carry, eos_ids: jax.Array, params: BeamParams, max_new_tokens: int):
  """Chooses the next running beams and finished hypotheses from `c.logits`. Returns (the carry
  without new logits, the source beam of each new running beam `[batch, W]`)."""
  batch, w, vocab = c.logits.shape
  keep = max(2, 1 + eos_ids.shape[0]) * w
  scores = jax.nn.log_softmax(c.logits, axis=-1) + c.running.scores[..., None]
  top_scores, top = jax.lax.top_k(scores.reshape(batch, w * vocab), keep)  # [b, K]
  source, token = top // vocab, (top % vocab).astype(jnp.int32)
  seqs = _take(c.running.tokens, source).at[:, :, c.step].set(token)  # [b, K, N]
  ends = jnp.isin(token, eos_ids) | (c.step + 1 >= max_new_tokens)

  run_scores, run = jax.lax.top_k(top_scores + ends * NEG, w)
  running = _Beams(_take(seqs, run), run_scores, jnp.full((batch, w), c.step + 1, jnp.int32))

  just_finished = ends & (jnp.arange(keep) < w)[None, :]
  penalised = top_scores / (c.step + 1.0) ** params.length_penalty
  full = jnp.all(c.is_finished, axis=1, keepdims=True) & (params.early_stopping is True)
  penalised = penalised + full * NEG + (~c.improvable[:, None]) * NEG + (~just_finished) * NEG
  merged = jnp.concatenate([c.finished.scores, penalised], axis=1)
  best_scores, best = jax.lax.top_k(merged, w)
  finished = _Beams(
      _take(jnp.concatenate([c.finished.tokens, seqs], axis=1), best), best_scores,
      _take(jnp.concatenate([c.finished.length, jnp.full((batch, keep), c.step + 1, jnp.int32)], 1), best))
  is_finished = _take(jnp.concatenate([c.is_finished, just_finished], axis=1), best)

  length = c.step + 1.0 if not (params.early_stopping == "never" and params.length_penalty > 0) \
      else float(max_new_tokens)
  best_possible = running.scores[:, 0] / length ** params.length_penalty
  worst = jnp.where(is_finished, jnp.min(finished.scores, axis=1, keepdims=True), NEG)
  improvable = c.improvable & jnp.any(best_possible[:, None] > worst, axis=1)
  go_on = (jnp.any(improvable) & ~(jnp.all(is_finished) & (params.early_stopping is True))
           & ~jnp.all(ends))
  source_beam = _take(source, run)
  return dataclasses.replace(c, running=running, finished=finished, is_finished=is_finished,
                             improvable=improvable, step=c.step + 1, go_on=go_on), source_beam


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens", "cache_len", "pad_id",
                                             "cache_dtype", "mesh"))
def beam_generate(state: nnx.State, tokens: jax.Array, prompt_lens: jax.Array, eos_ids: jax.Array, *,
                  graphdef: nnx.GraphDef, params: BeamParams, max_new_tokens: int, cache_len: int,
                  pad_id: int, cache_dtype=jnp.float32, mesh: Mesh | None = None) -> BeamOutput:
  """Beam search over right-padded prompts `[batch, P]` (lengths `prompt_lens`). `cache_len` must
  be at least P + max_new_tokens."""
  model = nnx.merge(graphdef, state)
  batch, w = tokens.shape[0], params.num_beams
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype, mesh)
  logits, _, cache = prefill(model, tokens, prompt_lens, cache)
  cache = cache.take_rows(jnp.repeat(jnp.arange(batch), w))
  empty = jnp.full((batch, w, max_new_tokens), pad_id, jnp.int32)
  zeros = jnp.zeros((batch, w), jnp.int32)
  first = jnp.where(jnp.arange(w) == 0, 0.0, NEG)[None, :].repeat(batch, 0)  # one live beam at first
  carry = _Carry(cache, jnp.repeat(logits[:, None], w, axis=1), _Beams(empty, first, zeros),
                 _Beams(empty, jnp.full((batch, w), NEG), zeros), zeros.astype(bool),
                 jnp.ones((batch,), bool), jnp.int32(0), jnp.bool_(True))

  def body(c: _Carry) -> _Carry:
    c, source = beam_step(c, eos_ids, params, max_new_tokens)
    rows = (jnp.arange(batch)[:, None] * w + source).reshape(-1)
    last = c.running.tokens[:, :, c.step - 1].reshape(-1)

    def forward(cache):  # the new beams' next-token logits (not after the last step)
      logits, _, cache = model(last[:, None], cache.lengths[:, None], cache.take_rows(rows))
      return logits[:, 0].reshape(c.logits.shape), cache.advance(jnp.ones_like(last))

    logits, cache = jax.lax.cond(c.go_on, forward, lambda cache: (c.logits, cache), c.cache)
    return dataclasses.replace(c, cache=cache, logits=logits)

  end = jax.lax.while_loop(lambda c: c.go_on, body, carry)
  return BeamOutput(end.finished.tokens, end.finished.length, end.finished.scores, end.step)
