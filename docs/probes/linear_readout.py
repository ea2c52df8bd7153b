"""The probes' linear read-out: ridge regression on standardised features."""

import numpy as np


def ridge_fit_predict(x, y, x_test, lam=1.0):
  """Fits ridge regression (a free bias, penalty `lam`) from `x` [N, F] to `y` [N, K] and
  returns its predictions for `x_test`; each feature is standardised by `x`'s statistics."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  add_bias = lambda a: np.concatenate([(a - mean) / std, np.ones((len(a), 1))], 1)
  xb = add_bias(x)
  w = np.linalg.solve(xb.T @ xb + lam * np.eye(xb.shape[1]), xb.T @ y)
  return add_bias(x_test) @ w
