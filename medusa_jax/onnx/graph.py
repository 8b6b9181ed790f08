"""The decoder (and Medusa heads) as an ONNX graph, built from the weights with onnx's helper API
(no tracing, no torch), with onnxruntime-genai's input and output names.

Inputs: `input_ids` `[batch, seq]` int64, `attention_mask` `[batch, past + seq]` int64 (0: a slot
not to attend, e.g. padding or a rejected tree node's hole), `position_ids` `[batch, seq]` int64,
`past_key_values.{i}.key|value` `[batch, kv_heads, past, head_dim]`, and `tree_mask`
`[batch, seq, past + seq]` bool: which earlier positions each query may see besides causality and
`attention_mask`; its default (an all-true `[1, 1, 1]`) is plain causal decoding, a Medusa tree
step passes its ancestors. Outputs: `logits` `[batch, seq, vocab]`, `present.{i}.key|value`
`[batch, kv_heads, past + seq, head_dim]` (the past then the chunk), and with heads
`medusa_logits` `[heads, batch, seq, vocab]` (outside the heads' drafting vocabulary: -1e9).
Computation in float32; `float16` stores the weights in half precision.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from medusa_jax.model.config import ModelConfig
from medusa_jax.model.rope import inverse_frequencies

OPSET = 18
OUTSIDE_DRAFT = -1e9  # a head's logit for tokens outside its drafting vocabulary
_MASKED = -1e30


class _Builder:
  """Nodes and initializers of one graph; `op` returns its (single) output's name."""

  def __init__(self, weight_dtype):
    self.nodes, self.initializers, self.weight_dtype, self._n = [], [], weight_dtype, 0

  def _name(self, hint: str) -> str:
    self._n += 1
    return f"{hint}_{self._n}"

  def const(self, value, hint: str = "const") -> str:
    name = self._name(hint)
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def weight(self, name: str, value) -> str:
    """A float weight, stored in `weight_dtype` and read as float32."""
    value = np.asarray(value, np.float32)
    self.initializers.append(numpy_helper.from_array(value.astype(self.weight_dtype), name))
    return name if self.weight_dtype == np.float32 else self.op("Cast", name, to=TensorProto.FLOAT)

  def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
    out = out or self._name(op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
    return out

  def rms_norm(self, x: str, scale: str, eps: float) -> str:
    mean = self.op("ReduceMean", self.op("Mul", x, x), self.const(np.array([-1], np.int64)), keepdims=1)
    inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", mean, self.const(np.float32(eps)))))
    return self.op("Mul", self.op("Mul", x, inv), scale)

  def silu(self, x: str) -> str:
    return self.op("Mul", x, self.op("Sigmoid", x))

  def rope(self, x: str, cos: str, sin: str, half: int) -> str:
    """x `[batch, heads, seq, head_dim]`, cos/sin `[batch, 1, seq, head_dim / 2]`."""
    axes = self.const(np.array([3], np.int64))
    x1 = self.op("Slice", x, self.const(np.array([0], np.int64)), self.const(np.array([half], np.int64)), axes)
    x2 = self.op("Slice", x, self.const(np.array([half], np.int64)), self.const(np.array([2 * half], np.int64)),
                 axes)
    first = self.op("Sub", self.op("Mul", x1, cos), self.op("Mul", x2, sin))
    second = self.op("Add", self.op("Mul", x2, cos), self.op("Mul", x1, sin))
    return self.op("Concat", first, second, axis=3)


def _array(x) -> np.ndarray:
  return np.asarray(x[...], np.float32)


def build(model, heads=None, draft=None, *, weight_dtype=np.float32) -> onnx.ModelProto:
  """The ONNX decoder of a `Llama` (with `MedusaHeads`, restricted to `draft` (a `DraftVocab`) when
  given)."""
  c: ModelConfig = model.config
  g = _Builder(weight_dtype)
  h, kv, d, e = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
  batch_seq = ["batch", "seq"]
  inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, batch_seq),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, batch_seq)]
  outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])]
  cache_shape = ["batch", kv, "past", d]
  for i in range(c.num_layers):
    for kind in ("key", "value"):
      inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache_shape))
      outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                   ["batch", kv, "total", d]))
  inputs.append(helper.make_tensor_value_info("tree_mask", TensorProto.BOOL, ["batch", "seq", "total"]))
  g.initializers.append(numpy_helper.from_array(np.ones((1, 1, 1), bool), "tree_mask"))  # the default

  # mask bias [batch, 1, 1, seq, total]: causal, attention_mask and tree_mask together
  zero, one = g.const(np.int64(0)), g.const(np.int64(1))
  past = g.op("Squeeze", g.op("Shape", "past_key_values.0.key", start=2, end=3))
  seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2))
  total = g.op("Add", past, seq)
  keys = g.op("Unsqueeze", g.op("Range", zero, total, one), g.const(np.array([0], np.int64)))  # [1, T]
  queries = g.op("Unsqueeze", g.op("Add", g.op("Range", zero, seq, one), past), g.const(np.array([1], np.int64)))
  allowed = g.op("And", g.op("LessOrEqual", keys, queries),  # [seq, T]
                 g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL),
                      g.const(np.array([1], np.int64))))  # [batch, 1, T]
  allowed = g.op("And", allowed, "tree_mask")
  bias = g.op("Where", allowed, g.const(np.float32(0)), g.const(np.float32(_MASKED)))
  bias = g.op("Unsqueeze", bias, g.const(np.array([1, 2], np.int64)))

  # rotary tables [max_position, head_dim / 2], gathered at position_ids -> [batch, 1, seq, head_dim / 2]
  angles = (np.arange(c.max_position_embeddings, dtype=np.float32)[:, None]
            * inverse_frequencies(d, c.rope_theta, c.rope_scaling)[None, :]).astype(np.float32)
  tables = [g.op("Unsqueeze", g.op("Gather", g.const(f(angles).astype(np.float32), name), "position_ids", axis=0),
                 g.const(np.array([1], np.int64))) for f, name in ((np.cos, "rope_cos"), (np.sin, "rope_sin"))]

  embed = g.weight("embed", _array(model.embed.embedding))
  x = g.op("Gather", embed, "input_ids", axis=0)
  scale = g.const(np.float32(d ** -0.5))
  for i, block in enumerate(model.layers):
    a, p = block.attn, f"layers.{i}"
    y = g.rms_norm(x, g.weight(f"{p}.attn_norm", _array(block.attn_norm.scale)), c.rms_norm_eps)

    def project(name, kernel, bias_, heads_):
      out = g.op("MatMul", y, g.weight(f"{p}.{name}", _array(kernel).reshape(e, heads_ * d)))
      if bias_ is not None:
        out = g.op("Add", out, g.weight(f"{p}.{name}_bias", _array(bias_).reshape(-1)))
      out = g.op("Reshape", out, g.const(np.array([0, 0, heads_, d], np.int64)))
      return g.op("Transpose", out, perm=[0, 2, 1, 3])  # [batch, heads, seq, head_dim]

    q = g.rope(project("q", a.q, a.q_bias, h), *tables, d // 2)
    k = g.rope(project("k", a.k, a.k_bias, kv), *tables, d // 2)
    v = project("v", a.v, a.v_bias, kv)
    k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
    v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
    # grouped query attention: [batch, kv, group, seq, head_dim] against [batch, kv, 1, T, head_dim]
    q = g.op("Reshape", q, g.const(np.array([0, kv, h // kv, -1, d], np.int64)))
    two = g.const(np.array([2], np.int64))
    scores = g.op("MatMul", q, g.op("Transpose", g.op("Unsqueeze", k, two), perm=[0, 1, 2, 4, 3]))
    probs = g.op("Softmax", g.op("Add", g.op("Mul", scores, scale), bias), axis=-1)
    out = g.op("MatMul", probs, g.op("Unsqueeze", v, two))
    out = g.op("Transpose", g.op("Reshape", out, g.const(np.array([0, h, -1, d], np.int64))), perm=[0, 2, 1, 3])
    out = g.op("Reshape", out, g.const(np.array([0, 0, h * d], np.int64)))
    x = g.op("Add", x, g.op("MatMul", out, g.weight(f"{p}.o", _array(a.o).reshape(h * d, e))))
    y = g.rms_norm(x, g.weight(f"{p}.mlp_norm", _array(block.mlp_norm.scale)), c.rms_norm_eps)
    gate = g.silu(g.op("MatMul", y, g.weight(f"{p}.gate", _array(block.mlp.gate.kernel))))
    up = g.op("MatMul", y, g.weight(f"{p}.up", _array(block.mlp.up.kernel)))
    x = g.op("Add", x, g.op("MatMul", g.op("Mul", gate, up), g.weight(f"{p}.down", _array(block.mlp.down.kernel))))

  hidden = g.rms_norm(x, g.weight("norm", _array(model.norm.scale)), c.rms_norm_eps)
  lm_head = (g.op("Transpose", embed, perm=[1, 0]) if model.lm_head is None  # tied: stored once
             else g.weight("lm_head", _array(model.lm_head.kernel)))
  g.op("MatMul", hidden, lm_head, out="logits")

  if heads is not None:
    outputs.append(helper.make_tensor_value_info("medusa_logits", TensorProto.FLOAT,
                                                 [heads.config.num_heads, "batch", "seq", c.vocab_size]))
    per_head = []
    ids = None if draft is None else g.const(np.asarray(draft.ids, np.int64)[:, None], "draft_ids")
    for k_, blocks in enumerate(heads.blocks):
      f = hidden
      for j, block in enumerate(blocks):
        w = g.weight(f"medusa.{k_}.{j}.linear", _array(block.linear.kernel))
        b = g.weight(f"medusa.{k_}.{j}.bias", _array(block.linear.bias))
        f = g.op("Add", f, g.silu(g.op("Add", g.op("MatMul", f, w), b)))
      per_head.append(g.op("Unsqueeze", _head_logits(g, f, k_, heads, draft, ids, lm_head, c.vocab_size),
                           g.const(np.array([0], np.int64))))
    g.op("Concat", *per_head, axis=0, out="medusa_logits")

  graph = helper.make_graph(g.nodes, "medusa_jax_decoder", inputs, outputs, g.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="medusa_jax")
  proto.ir_version = 9  # onnxruntime >= 1.16
  return proto


def _head_logits(g: _Builder, feats: str, k: int, heads, draft, ids: str | None, lm_head: str, vocab: int) -> str:
  """Head `k`'s logits `[batch, seq, vocab]`: over the whole vocabulary, or over the drafting ids
  (`ids`, `[Vd, 1]`) scattered into a `OUTSIDE_DRAFT`-filled row."""
  if draft is None:
    kernel = lm_head if heads.lm_heads is None else g.weight(f"medusa.{k}.lm_head", _array(heads.lm_heads[k].kernel))
    return g.op("MatMul", feats, kernel)
  kernels = np.asarray(draft.kernels, np.float32)
  kernel = g.weight(f"medusa.{k}.draft_lm_head", kernels[k if len(kernels) > 1 else 0])
  small = g.op("Transpose", g.op("MatMul", feats, kernel), perm=[2, 0, 1])  # [Vd, batch, seq]
  shape = g.op("Concat", g.const(np.array([vocab], np.int64)), g.op("Shape", feats, start=0, end=2), axis=0)
  full = g.op("Expand", g.const(np.float32(OUTSIDE_DRAFT)), shape)
  return g.op("Transpose", g.op("ScatterND", full, ids, small), perm=[1, 2, 0])
