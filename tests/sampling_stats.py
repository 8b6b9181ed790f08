"""How far sampled tokens stray from the exact distributions they should follow, in standard
deviations. Shared by the lossless-sampling tests of every drafter.

Each sampled token i comes with the exact distribution `probs[i]` it should have been drawn from
given everything before it (a Markov chain's transition row, or a teacher-forced forward of the
target). Under exact sampling, three statistics are standard normal for many tokens:

- calibration: the randomised probability integral transform of each token (tokens ordered by
  decreasing probability) is uniform and independent; a chi-square over 20 bins, as a z-score;
- directed: the count of tokens in a set where an error shows first (`over[i]`, e.g. the tokens a
  drafter proposes) against its expectation, the martingale variance as its scale;
- dispersion: the same residual summed per row, squared and pooled over rows, against its
  expectation: a row whose steps reuse random numbers makes its tokens move together.
"""

from __future__ import annotations

import numpy as np


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
