"""The notebook API: `medusa_jax.load(spec)` returns an `Engine` with `.tokenizer` and `.generate()`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medusa_jax.cache import enable_compilation_cache
from medusa_jax.decode.beam import beam_generate, speculative_beam_generate
from medusa_jax.decode.config import GenerationConfig
from medusa_jax.decode.drafting import Plan, resolve
from medusa_jax.decode.loaded import DraftModel, LoadedModel
from medusa_jax.decode.plain import baseline_generate
from medusa_jax.decode.speculative import speculative_generate
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.eagle import EagleConfig, EagleHead
from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.medusa.tree import Tree, default_tree, get_tree
from medusa_jax.model.llama import Llama
from medusa_jax.model.sharding import batch_sharding, check_model_fits, shard_state
from medusa_jax.model.tokenizer import Message, encode_chat


@dataclasses.dataclass
class Generation:
  """One answer: the fields of `infer/generate.py --json`."""

  text: str
  token_ids: list[int]
  new_tokens: int
  steps: int
  tokens_per_step: float
  seconds: float
  tokens_per_second: float


class GenerationResult(NamedTuple):
  """`Engine.generate_ids`' answer for a batch (NumPy arrays); beam search: `num_return_sequences`
  rows per prompt, best first."""

  tokens: np.ndarray      # `[batch, max_new_tokens]` new tokens, padding past `num_tokens`
  num_tokens: np.ndarray  # `[batch]` tokens emitted (EOS included)
  steps: np.ndarray       # `[batch]` forward passes that emitted them (prefill counts as one)
  seconds: float          # the device run, compilation excluded


def bucket(n: int, minimum: int = 32) -> int:
  """The shape bucket (next power of two, at least `minimum`) for a length `n`."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to `[batch, length]`; returns (tokens, lengths)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


class Engine:
  """A backbone and optional Medusa heads with its tokenizer, held as graphdef + state so every
  generation is a pure jitted function of (state, inputs). One compilation per shape bucket.

  On a `mesh` (`model.sharding.make_mesh` / `parse_mesh`) the weights and heads are placed by the
  logical axis rules (attention heads, MLP and vocabulary over `tensor`), prompts are split over
  `data` x `fsdp` when the batch divides (else replicated) and the KV cache is sharded like the
  weights: the same jitted loops run tensor- and data-parallel."""

  def __init__(self, model: Llama, tokenizer, *, heads: MedusaHeads | EagleHead | None = None,
               tree: str | Tree | Sequence[Sequence[int]] | None = None, name: str = "model",
               max_cache_len: int | None = None, draft_vocab: Sequence[int] | None = None,
               mesh: Mesh | None = None, lookup: int = 0):
    enable_compilation_cache()
    self.mesh = mesh
    self.lookup = lookup  # the lookup chain Medusa grafts on when a config leaves `lookup` None
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.heads_graphdef, self.heads_state = nnx.split(heads) if heads is not None else (None, None)
    if mesh is not None:
      check_model_fits(model.config, mesh)
      self.state = shard_state(self.state, mesh)
      self.heads_state = None if heads is None else shard_state(self.heads_state, mesh)
    self.heads_config = heads.config if heads is not None else None
    self.tree = None
    self.draft: DraftVocab | None = None
    self.eagle: EagleConfig | None = heads.config if isinstance(heads, EagleHead) else None
    if self.eagle is not None:
      if tree is not None:
        self.set_tree(tree)  # refused: an EAGLE drafter's tree is grown each step
      if draft_vocab is None or len(draft_vocab) != self.eagle.draft_vocab_size:
        raise MedusaError(f"an EAGLE drafter needs its {self.eagle.draft_vocab_size} drafting token ids "
                          "(draft_vocab)")
      self.draft = DraftVocab(self._place(np.asarray(draft_vocab, np.int32), split=False), None)
    elif heads is not None:
      self.set_tree(tree if tree is not None else default_tree(None, heads.config.num_heads).paths)
      self.set_draft_vocab(draft_vocab)
    self.dtype = model.dtype
    self.tokenizer = tokenizer
    self.name = name
    self.max_cache_len = max_cache_len or self.config.max_position_embeddings
    eos = set(self.config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
      eos.add(int(tokenizer.eos_token_id))
    self.eos_ids = self._place(np.asarray(sorted(eos), np.int32), split=False)
    self.pad_id = int(self.config.pad_token_id)
    self._compiled: dict = {}
    self.compile_seconds = 0.0
    self.draft_model: DraftModel | None = None  # `set_draft_model`

  def _place(self, x: np.ndarray, split: bool = True) -> jax.Array:
    """A host input on the device(s): rows split over the mesh's data x fsdp when `split` and they
    divide, else replicated."""
    if self.mesh is None:
      return jnp.asarray(x)
    rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    sharding = (batch_sharding(self.mesh, x.ndim) if split and x.ndim and x.shape[0] % rows == 0
                else NamedSharding(self.mesh, PartitionSpec()))
    return jax.device_put(x, sharding)

  def _call(self, fn, *args, **static):
    """Runs jitted `fn` on positional array arguments `args`, compiling once per (fn, argument
    structure and shapes, static keyword arguments); returns (device-fetched output, seconds of
    the run alone)."""
    static = dict(graphdef=self.graphdef, mesh=self.mesh, **static)
    key = (fn.__name__, jax.tree.structure(args[1:]),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:])),
           tuple(sorted(static.items(), key=lambda kv: kv[0])))
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = fn.lower(*args, **static).compile()
      self.compile_seconds += time.perf_counter() - start
    start = time.perf_counter()
    out = jax.device_get(self._compiled[key](*args))
    return out, time.perf_counter() - start

  def with_heads(self, heads: MedusaHeads | EagleHead, *, tree=None, draft_vocab: Sequence[int] | None = None,
                 lookup: int = 0) -> Engine:
    """An engine over this one's backbone (the same arrays) with other `heads` (their `tree`,
    drafting vocabulary and lookup chain as `Engine` takes them; `medusa_jax.load_heads` reads
    them from a directory)."""
    engine = Engine(self.model, self.tokenizer, heads=heads, tree=tree, name=self.name,
                    max_cache_len=self.max_cache_len, draft_vocab=draft_vocab, mesh=self.mesh, lookup=lookup)
    engine.draft_model = self.draft_model
    return engine

  def set_tree(self, tree: str | Tree | Sequence[Sequence[int]]) -> None:
    """Chooses the candidate tree (a name, a list of paths, or a `Tree`), checked against the heads."""
    if self.eagle is not None:
      raise MedusaError("an EAGLE drafter grows its tree each step: set draft_beams, draft_depth and "
                        "tree_budget instead of a tree")
    tree = get_tree(tree, num_heads=self.heads_config.num_heads, vocab_size=self.config.vocab_size)
    if self.draft is not None and tree.topk > len(self.draft.ids):
      raise MedusaError(f"tree asks for top-{tree.topk} guesses of a {len(self.draft.ids)}-token "
                        "drafting vocabulary")
    self.tree = tree

  def set_draft_vocab(self, ids: Sequence[int] | None) -> None:
    """Restricts the heads' guesses to the token ids `ids` (`draft_vocab.py`); None: the whole
    vocabulary. Outputs do not change, only which guesses the heads can make."""
    if self.heads_graphdef is None or self.eagle is not None:
      raise MedusaError("a drafting vocabulary needs Medusa heads (load some with heads=...); an EAGLE "
                        "drafter's is its own")
    self.draft = None if ids is None else DraftVocab.build(self.model, self.heads, ids, self.tree.topk)

  def set_draft_model(self, draft: str | Llama | None, tokenizer=None) -> None:
    """The model `mode="draft"` drafts with: "self:L" (this model's first L layers, then its final
    norm and lm_head: no extra weights), a `Llama` (with its `tokenizer`, which must match this
    model's vocabulary), or None."""
    layers = self.config.num_layers
    if draft is None:
      self.draft_model = None
    elif isinstance(draft, str):
      if not (draft.startswith("self:") and draft[5:].isdigit()):
        raise MedusaError(f"a draft model is self:L (the first L of the {layers} layers) or a model spec; "
                          f"got {draft!r}")
      if not 1 <= int(draft[5:]) <= layers:
        raise MedusaError(f"{draft}: L must be in 1..{layers}, the model's layers")
      self.draft_model = DraftModel(num_layers=int(draft[5:]))
    else:
      if draft.config.vocab_size != self.config.vocab_size:
        raise MedusaError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the "
                          f"target's ({self.config.vocab_size})")
      vocab = getattr(tokenizer, "get_vocab", None)
      if vocab is not None and hasattr(self.tokenizer, "get_vocab") and vocab() != self.tokenizer.get_vocab():
        raise MedusaError("the draft model's tokenizer maps tokens to other ids than the target's")
      graphdef, state = nnx.split(draft)
      self.draft_model = DraftModel(graphdef, state if self.mesh is None else shard_state(state, self.mesh))

  @property
  def heads(self) -> MedusaHeads | None:
    return None if self.heads_graphdef is None else nnx.merge(self.heads_graphdef, self.heads_state)

  @property
  def model(self) -> Llama:
    return nnx.merge(self.graphdef, self.state)

  def encode(self, prompt: str | Sequence[Message], chat: bool = True) -> list[int]:
    return encode_chat(self.tokenizer, prompt, chat)

  def _check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, extra: int) -> int:
    if not prompts:
      raise MedusaError("no prompts given")
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
      raise MedusaError("a prompt is empty")
    for p in prompts:
      if max(p) >= self.config.vocab_size or min(p) < 0:
        raise MedusaError(f"a prompt holds a token id outside the vocabulary [0, {self.config.vocab_size})")
    need = longest + max_new_tokens + extra
    if need > self.max_cache_len:
      raise MedusaError(
          f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} (+{extra} for the tree) "
          f"exceeds the cache length {self.max_cache_len}"
      )
    return bucket(longest)

  @property
  def loaded(self) -> LoadedModel:
    """What this engine runs with (the server's view of it)."""
    return LoadedModel(self.graphdef, self.state, self.config, self.tokenizer, self.eos_ids, self.pad_id,
                       self.dtype, self.mesh, self.heads_graphdef, self.heads_state,
                       getattr(self.heads_config, "num_heads", 0), self.tree, self.draft,
                       self.lookup, self.draft_model, self.eagle)

  def plan(self, config: GenerationConfig | None = None, batch: int = 1, **settings) -> Plan:
    """How `config` (with `settings`) generates here (`drafting.resolve`), or a one-line error."""
    return resolve((config or GenerationConfig()).replace(**settings), self.loaded, batch=batch)

  def _place_arrays(self, tree):
    """Host NumPy leaves of `tree` (per-row settings) on the device(s), rows split like prompts."""
    return jax.tree.map(lambda x: self._place(x) if isinstance(x, np.ndarray) else x, tree)

  def generate_ids(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
                   **settings) -> GenerationResult:
    """Token-level generation of token-id prompts under `config` (default `GenerationConfig()`)
    with any of its fields overridden by keyword (`max_new_tokens=64`, `temperature=0.7`, ...).
    Medusa at temperature 0 is greedy and identical to baseline greedy decoding. Sampling
    settings are arrays of the compiled programs, so a new temperature or top-p compiles nothing."""
    config = (config or GenerationConfig()).replace(**settings)
    plan = self.plan(config, batch=len(prompts))
    max_new_tokens = config.max_new_tokens
    extra = plan.tree_size
    length = self._check_lengths(prompts, max_new_tokens, extra)
    tokens, lens = pad_prompts(prompts, length, self.pad_id)
    cache_len = -(-(length + max_new_tokens + max(extra, 1)) // 64) * 64
    args = (self._place(tokens), self._place(lens), self._place(np.asarray(jax.random.PRNGKey(config.seed)), False),
            self.eos_ids)
    common = dict(max_new_tokens=max_new_tokens, cache_len=cache_len, pad_id=self.pad_id,
                  cache_dtype=self.dtype)
    drafter, params = plan.drafter, self._place_arrays(plan.params)
    if plan.mode == "beam":
      if drafter is None:
        out, seconds = self._call(beam_generate, self.state, *args[:2], self.eos_ids, params=plan.beam,
                                  **common)
      else:
        out, seconds = self._call(speculative_beam_generate, self.state, params, *args[:2], self.eos_ids,
                                  drafter=drafter, params=plan.beam, **common)
      n = config.num_return_sequences
      return GenerationResult(np.asarray(out.tokens[:, :n]).reshape(-1, max_new_tokens),
                              np.asarray(out.num_tokens[:, :n]).reshape(-1),
                              np.full(len(prompts) * n, int(out.steps), np.int32), seconds)
    if drafter is None:
      out, seconds = self._call(baseline_generate, self.state, self._place_arrays(plan.sampling), *args,
                                **common)
    else:
      out, seconds = self._call(speculative_generate, self.state, params, self._place_arrays(plan.rule), *args,
                                drafter=drafter, **common)
    return GenerationResult(np.asarray(out.tokens), np.asarray(out.num_tokens), np.asarray(out.steps),
                            seconds)

  def generate(self, prompts: str | Sequence[str | Sequence[Message]],
               config: GenerationConfig | None = None, *, chat: bool = True,
               **settings) -> Generation | list[Generation]:
    """Answers one prompt (returns a `Generation`) or a batch (returns a list; beam search:
    `num_return_sequences` per prompt, best first); `config` and `settings` as in `generate_ids`;
    `chat`: through the tokenizer's chat template."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    out = self.generate_ids([self.encode(p, chat) for p in batch], config, **settings)
    results = []
    for row, n, s in zip(out.tokens, out.num_tokens, out.steps):
      new = [int(t) for t in row[: int(n)]]
      results.append(Generation(
          text=self.tokenizer.decode(new, skip_special_tokens=True), token_ids=new,
          new_tokens=int(n), steps=int(s), tokens_per_step=float(n) / max(int(s), 1),
          seconds=out.seconds, tokens_per_second=float(n) / out.seconds if out.seconds > 0 else 0.0,
      ))
    return results[0] if single and len(results) == 1 else results
