"""Helpers shared by the test modules, imported as `from helpers import ...` (pytest puts `tests/`
on sys.path; subprocess scripts get it through PYTHONPATH). Fixtures live in conftest.py.

JAX, Flax and medusa_jax are imported inside the functions, so the modules that only need `ROOT`
(the command-line and start-up tests) stay light to import.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain how a refrigerator works in simple terms.",
]


# --- the server's slots ------------------------------------------------------------------------


def decode_in_chunks(engine, prompts, mode, *, max_new=48, plain_every=0, pattern="", cheaper=False, **settings):
  """Greedy rows decoded by the server's slots (`serve/slots.py`; one slot more than rows), 2 steps
  a chunk over `mode`'s drafter (as the server runs it: `drafting.for_slots`); with `plain_every`
  n, every n-th chunk plain; with `pattern` (e.g. "DPP"), chunk i drafted or plain as its
  character i (cycled) says; with `cheaper`, the
  chunks take turns over plain, the drafter's `cheaper_drafters` and the drafter (the server's
  choices). Returns (each row's tokens, chunks run, each drafted chunk's (counts, budgets left
  before it) per row)."""
  import jax.numpy as jnp

  from medusa_jax.decode.drafters import cheaper_drafters
  from medusa_jax.decode.drafting import for_slots
  from medusa_jax.serve import slots as device

  plan = engine.plan(mode=mode, **settings)
  drafter, params = for_slots(plan.drafter, 2), plan.params
  turns = (None, *cheaper_drafters(drafter), drafter) if cheaper else (drafter,)
  rows = len(prompts)
  draft = drafter.empty(params, engine.model, rows + 1, 256, engine.dtype, None)
  slots = device.Slots.init(engine.config, rows + 1, 256, engine.dtype, draft=draft)
  out = [[] for _ in prompts]
  for i, p in enumerate(prompts):
    tokens = np.full((1, 64), engine.pad_id, np.int32)
    tokens[0, :len(p)] = p
    slots, first, _ = device.insert(engine.state, params, slots, jnp.int32(i), jnp.asarray(tokens),
                                    jnp.int32(len(p)), jnp.float32(0), jnp.float32(1), jnp.uint32(0),
                                    jnp.int32(max_new), jnp.bool_(True), engine.eos_ids, graphdef=engine.graphdef,
                                    drafter=drafter)
    out[i] = [int(first)]
  chunks, drafted = 0, []
  while not bool(np.asarray(slots.done[:rows]).all()):
    turn = turns[chunks % len(turns)]
    plain = (turn is None or bool(plain_every) and chunks % plain_every == plain_every - 1
             or bool(pattern) and pattern[chunks % len(pattern)] == "P")
    left = np.asarray(slots.budget[:rows])
    slots, tokens, counts = device.run_chunk(engine.state, params, slots, engine.eos_ids, graphdef=engine.graphdef,
                                             drafter=turn or drafter, bucket=rows, steps=2, plain=plain)
    for i in range(rows):
      out[i] += [int(t) for t in np.asarray(tokens[i])[: int(counts[i])]]
    if not plain:
      drafted.append((np.asarray(counts), left))
    chunks += 1
  return out, chunks, drafted



# --- tiny models and heads -----------------------------------------------------------------------


def random_heads(model, config=None, seed=0, scale=0.05):
  """Heads with random non-zero weights everywhere (not the identity they start as); `config`
  defaults to `HeadsConfig(4, 2, False)`."""
  import jax
  from flax import nnx

  from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads

  heads = MedusaHeads.for_model(model, HeadsConfig(4, 2, False) if config is None else config)
  graphdef, state = nnx.split(heads)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(state))))
  state = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), state)
  return nnx.merge(graphdef, state)


def random_prompts(seed, lengths):
  """One prompt of random token ids (3 to 499) per length."""
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 500, size=n)) for n in lengths]


def permutation_model(seed=0, vocab=64):
  """A backbone whose greedy next token is sigma(current token), for a random permutation sigma:
  one-hot embeddings, zeroed attention and MLP outputs, lm_head = the permutation matrix."""
  import dataclasses

  import jax.numpy as jnp

  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  config = dataclasses.replace(preset("tiny"), vocab_size=vocab, hidden_size=vocab,
                               tie_embeddings=False, eos_token_ids=(vocab - 1,))
  model = random_model(config, seed=seed)
  sigma = np.random.default_rng(seed).permutation(vocab)
  model.embed.embedding[...] = jnp.eye(vocab)
  model.lm_head.kernel[...] = jnp.eye(vocab)[sigma]  # row x -> one-hot sigma(x)
  for layer in model.layers:
    layer.attn.o[...] = jnp.zeros_like(layer.attn.o[...])
    layer.mlp.down.kernel[...] = jnp.zeros_like(layer.mlp.down.kernel[...])
  return model, sigma


def permutation_chain(sigma, start: int, n: int) -> list[int]:
  """The `n` tokens the permutation model emits after `start`: sigma(start), sigma(sigma(start)), ..."""
  out, t = [], int(start)
  for _ in range(n):
    t = int(sigma[t])
    out.append(t)
  return out


def check_oracle_fills_every_step(engine, sigma, depth: int, **drafting) -> None:
  """`engine` (the permutation model with an always-right drafter, `drafting` its settings) emits
  the permutation's chain in steps of `depth` + 1 tokens, greedy, lossless sampling and typical
  acceptance alike."""
  import jax.numpy as jnp

  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  prompts = [[int(t) % 64 for t in p] for p in random_prompts(7, [6, 13])]
  n = 41
  for settings in (dict(), dict(temperature=0.5), dict(temperature=0.5, acceptance="typical")):
    tokens, counts, steps, _ = engine.generate_ids(prompts, max_new_tokens=n, mode="medusa", **drafting, **settings)
    for p, row in zip(prompts, tokens):
      assert list(row) == permutation_chain(sigma, p[-1], n)
    assert (steps == 1 + -(-(n - 1) // (depth + 1))).all(), (settings, steps)


def oracle_heads(model, sigma, num_heads):
  """Heads whose top-1 guess is always right: head k maps token x to sigma^(k+2)(x)."""
  import jax.numpy as jnp

  from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads

  heads = MedusaHeads.for_model(model, HeadsConfig(num_heads, 1, share_lm_head=False))
  power = sigma.copy()
  for lm in heads.lm_heads:
    power = sigma[power]
    lm.kernel[...] = jnp.eye(len(sigma))[power]
  return heads


def oracle_hydra_heads(model, num_heads):
  """Hydra heads whose top-1 guess is always right, sharing the base lm_head (sigma): head k's
  features are the embedding of the token it reads (input kernel [0; 0; I]), so it predicts that
  token's successor; only sequential drafting makes such heads right at every depth."""
  import jax.numpy as jnp

  from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads

  heads = MedusaHeads.for_model(model, HeadsConfig(num_heads, 1, True, "hydra"))
  e = model.config.hidden_size
  for linear in heads.inputs:
    linear.kernel[...] = jnp.concatenate([jnp.zeros((2 * e, e)), jnp.eye(e)])
  return heads


def oracle_eagle(model, successor, lm_kernel, width=3, depth=3, budget=10):
  """An EAGLE drafter for a model whose residual stream is the one-hot embedding of the current
  token (`permutation_model`, a Markov-chain model): its fused features select the token x_t, its
  MLP turns one-hot(i) into one-hot(successor[i]) (attention output zeroed), and its lm_head
  `lm_kernel` `[V, V]` (row i: the logits after token i) ranks the tokens after that. With
  successor sigma and lm_head sigma it is always right at every depth."""
  import jax
  import jax.numpy as jnp

  from medusa_jax.medusa.eagle import EagleConfig, EagleHead, default_taps

  v = model.config.vocab_size
  config = EagleConfig(default_taps(model.config.num_layers), v, width, depth, budget)
  head = EagleHead.for_model(model, config, np.arange(v, dtype=np.int32))
  eye = jnp.eye(v)
  head.fc.kernel[...] = jnp.concatenate([eye] + [jnp.zeros((v, v))] * (len(config.taps) - 1))
  head.attn.o[...] = jnp.zeros_like(head.attn.o[...])
  for norm in (head.mlp_norm, head.norm):
    norm.scale[...] = jnp.ones_like(norm.scale[...])
  width_mlp = head.mlp.gate.kernel[...].shape[1]
  pad = jnp.zeros((v, width_mlp - v))
  head.mlp.gate.kernel[...] = jnp.concatenate([eye, pad], axis=1)
  head.mlp.up.kernel[...] = jnp.concatenate([eye, pad], axis=1)
  unit = float(jax.nn.silu(jnp.sqrt(v)) * jnp.sqrt(v))  # unit i's value for the normed one-hot(i)
  moves = (eye[np.asarray(successor)] - eye) / unit
  head.mlp.down.kernel[...] = jnp.concatenate([moves, jnp.zeros((width_mlp - v, v))])
  head.lm_head.kernel[...] = jnp.asarray(lm_kernel, jnp.float32)
  return head


def random_eagle(model, width=3, depth=3, budget=8, seed=0, scale=0.1):
  """An EAGLE drafter for `model` with random weights everywhere, drafting over ids 3..258 (and
  that default tree); returns (drafter, its ids)."""
  import jax
  from flax import nnx

  from medusa_jax.medusa.eagle import EagleConfig, EagleHead, default_taps

  ids = np.arange(3, 259, dtype=np.int32)
  config = EagleConfig(default_taps(model.config.num_layers), len(ids), width, depth, budget)
  graphdef, state = nnx.split(EagleHead.for_model(model, config, ids))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(state))))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), state)), ids


def write_tiny_eagle(path) -> None:
  """`random_eagle` for `random:tiny` (2 beams, 3 levels, 6 nodes), written as an EAGLE drafter
  directory."""
  from medusa_jax.formats import eagle as eagle_format
  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  head, ids = random_eagle(base, 2, 3, 6)
  eagle_format.write(str(path), head, ids, base, base_model="random:tiny")


def write_tiny_heads(path, num_heads: int = 3) -> None:
  """Random Medusa heads (shared lm_head) for `random:tiny`, written as a heads directory."""
  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.medusa.heads import HeadsConfig
  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  medusa_format.write(str(path), random_heads(base, HeadsConfig(num_heads, 1, True)), base,
                      base_model="random:tiny", lm_head_copies=False)


# --- the server as a live process ----------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(tmp_path, *flags: str, env: dict | None = None):
  """`infer/serve.py *flags` on a free port of 127.0.0.1, logging to `tmp_path` -> (process, base
  url) once /health answers 200."""
  import httpx

  port = _free_port()
  log = open(tmp_path / f"server-{port}.log", "w")
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "infer", "serve.py"), "--port", str(port), *flags],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
  base = f"http://127.0.0.1:{port}"
  deadline = time.time() + 600
  while time.time() < deadline:
    assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()[-3000:]
    try:
      health = httpx.get(f"{base}/health", timeout=2)
    except httpx.HTTPError:
      health = None
    if health is not None and health.status_code == 200:
      return proc, base
    if health is not None and health.status_code == 500:
      proc.kill()
      raise AssertionError(health.text)
    time.sleep(0.5)
  proc.kill()
  raise AssertionError("the server did not become healthy")


# --- sampling statistics -------------------------------------------------------------------------
# How far sampled tokens stray from the exact distributions they should follow, in standard
# deviations. Shared by the lossless-sampling tests of every drafter.
#
# Each sampled token i comes with the exact distribution `probs[i]` it should have been drawn from
# given everything before it (a Markov chain's transition row, or a teacher-forced forward of the
# target). Under exact sampling, three statistics are standard normal for many tokens:
#
# - calibration: the randomised probability integral transform of each token (tokens ordered by
#   decreasing probability) is uniform and independent; a chi-square over 20 bins, as a z-score;
# - directed: the count of tokens in a set where an error shows first (`over[i]`, e.g. the tokens a
#   drafter proposes) against its expectation, the martingale variance as its scale;
# - dispersion: the same residual summed per row, squared and pooled over rows, against its
#   expectation: a row whose steps reuse random numbers makes its tokens move together.


def deviation(probs: np.ndarray, tokens: np.ndarray, over: np.ndarray, rows: np.ndarray,
              seed: int = 0) -> float:
  """probs `[N, V]` exact distributions, tokens `[N]` drawn from them, over `[N, V]` bool, rows
  `[N]` the row (sequence) of each token -> the largest |z| of the three statistics (inf for a
  token outside its distribution's support)."""
  n = np.arange(len(tokens))
  p_token = probs[n, tokens]
  if (p_token <= 0).any():
    return np.inf
  order = np.argsort(-probs, axis=1, kind="stable")
  rank = np.argsort(order, axis=1)[n, tokens]
  below = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)[n, rank] - p_token
  pit = below + np.random.default_rng(seed).uniform(size=len(tokens)) * p_token
  counts = np.bincount(np.minimum((pit * 20).astype(int), 19), minlength=20)
  expected = len(tokens) / 20
  calibration = (np.sum((counts - expected) ** 2 / expected) - 19) / np.sqrt(38)

  mass = np.sum(probs * over, axis=1)
  residual = over[n, tokens] - mass
  variance = mass * (1 - mass)
  directed = residual.sum() / np.sqrt(variance.sum())

  _, row = np.unique(rows, return_inverse=True)
  per_row = np.bincount(row, weights=residual) ** 2
  row_variance = np.bincount(row, weights=variance)
  used = row_variance > 0
  dispersion = (per_row[used].sum() / row_variance[used].sum() - 1) * np.sqrt(used.sum() / 2)
  return float(max(abs(calibration), abs(directed), abs(dispersion)))


def markov_deviation(samples: np.ndarray, starts: np.ndarray, transition: np.ndarray,
                     over: np.ndarray) -> float:
  """`deviation` of sampled sequences `[rows, n]` after tokens `starts` `[rows]` from a Markov
  chain's `transition` `[V, V]`, with `over` `[V, V]` bool (next tokens suspected after each)."""
  prev = np.concatenate([starts[:, None], samples[:, :-1]], axis=1).ravel()
  rows = np.repeat(np.arange(len(samples)), samples.shape[1])
  return deviation(transition[prev], samples.ravel(), over[prev], rows)
