"""Stochastic estimators of the Hessian diagonal: approximate, never reported as exact.

Hutchinson: diag(H) = E[v ⊙ H v] for Rademacher v. In z-space, H_W v =
J_zᵀ H_z (J_z v) with J_z v = linear(a, v) (the layer's map without bias), so
each probe costs one Hessian-vector product of the suffix. The variance of one
probe's estimate of entry i is sum_{j != i} H_ij², so the error shrinks like
1/sqrt(probes).

Monte-Carlo factors: for piecewise-linear suffixes, replace the C exact columns
of the loss-Hessian factor by M random ones with the same second moment
(sampled labels for cross-entropy), so the cost is M instead of C backward
passes per example; unbiased, error ~ 1/sqrt(M).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from pipeline.curvature.autodiff import hvp
from pipeline.curvature.columns import factor_columns
from pipeline.curvature.folds import dense_products
from pipeline.curvature.patches import channel_patches, contract, expand
from pipeline.curvature.problem import Problem


def mean_and_stderr(estimates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the first axis of independent estimates, and its standard error."""
    if len(estimates) < 2:
        return estimates.mean(axis=0), np.full_like(estimates[0], np.inf)
    return estimates.mean(axis=0), estimates.std(axis=0, ddof=1) / np.sqrt(len(estimates))


def rademacher_probe(seed: int, probe: int, shape) -> tf.Tensor:
    """Probe ``probe`` for the whole weight: the same entries for every shard and worker."""
    bits = tf.random.stateless_uniform(shape, seed=[seed, probe], minval=0, maxval=2, dtype=tf.int32)
    return tf.cast(2 * bits - 1, tf.float32)


def probe_products(problem: Problem, x, y, probes: tf.Tensor, start: tf.Tensor, stop: tf.Tensor) -> tf.Tensor:
    """Sum over the batch of (v ⊙ H_W v)[:, start:stop] for each whole-weight probe v in (K, F, O), z channels start:stop.

    Probes span every channel, so a shard's estimate is exactly the slice of the whole-weight
    estimate, whatever the sharding.
    """
    target = problem.target
    u_in = target.input_stage(x)
    z = target.pre_activation(u_in)
    raw = target.patches(u_in)
    every = channel_patches(raw, target.group_ids(slice(0, target.z_channels)))
    mine = channel_patches(raw, target.group_ids(slice(start, stop)))

    def loss_of(delta):
        return problem.loss_sum(x, y, delta)

    def one(v):
        v = tf.cast(v, z.dtype)
        u = tf.reshape(expand(every, v), tf.shape(z))
        hu = target.flat(hvp(loss_of, tf.zeros_like(z), u))[:, :, start:stop]
        return v[:, start:stop] * contract(mine, hu)

    return tf.vectorized_map(one, probes)


class HutchinsonEngine:
    """Hutchinson estimate of the diagonal with its standard error."""

    name = "hutchinson"
    exact = False

    def __init__(self, problem: Problem, probes: int = 64, seed: int = 0, probe_chunk: int = 16):
        self.problem = problem
        self.probes = probes
        self.seed = seed
        self.probe_chunk = probe_chunk
        self._products = tf.function(functools.partial(probe_products, problem))

    def diagonal_sum(self, batches, channels: slice) -> tuple[np.ndarray, np.ndarray]:
        """(mean over probes of the summed estimate, its standard error), each (F, O') for z channels ``channels``."""
        shape = (self.problem.target.features, self.problem.target.z_channels)
        estimates = []
        for first in range(0, self.probes, self.probe_chunk):
            ids = range(first, min(first + self.probe_chunk, self.probes))
            probes = tf.stack([rademacher_probe(self.seed, k, shape) for k in ids])
            bounds = tf.constant(channels.start), tf.constant(channels.stop)
            total = np.zeros((len(ids), shape[0], channels.stop - channels.start), np.float64)
            for x, y in batches:
                total += self._products(x, y, probes, *bounds).numpy()
            estimates.append(total)
        return mean_and_stderr(np.concatenate(estimates, axis=0))


class MonteCarloFactorEngine:
    """Sampled-factor estimate of the diagonal with its standard error (piecewise-linear suffixes only)."""

    name = "monte_carlo"
    exact = False

    def __init__(self, problem: Problem, peel_softmax: bool, samples: int = 16, seed: int = 0):
        self.problem = problem
        self.samples = samples
        self.seed = seed

        def columns(x, y, batch_seed, start, stop):
            def sampled(logits, labels):
                return problem.loss.sampled_factor(logits, labels, samples, batch_seed)

            ids = tf.range(samples)
            return factor_columns(problem, x, y, ids, start, stop, peel_softmax, sampled)

        self._columns = tf.function(columns)
        target = problem.target
        self._patches = tf.function(lambda x, start, stop: channel_patches(target.patches(target.input_stage(x)),
                                                                           target.group_ids(slice(start, stop))))
        self._products = tf.function(dense_products)

    def diagonal_sum(self, batches, channels: slice) -> tuple[np.ndarray, np.ndarray]:
        """(sum over examples of the estimate, its standard error), each (F, O') for z channels ``channels``."""
        bounds = tf.constant(channels.start), tf.constant(channels.stop)
        per_sample = None
        for index, (x, y) in enumerate(batches):
            columns = self._columns(x, y, tf.constant(self.seed * 1_000_003 + index), *bounds)
            patches = self._patches(x, *bounds)
            parts = np.stack([self._products(patches, columns[m : m + 1]).numpy() for m in range(self.samples)])
            per_sample = parts if per_sample is None else per_sample + parts
        return mean_and_stderr(per_sample * self.samples)  # each sample alone is an unbiased estimate
