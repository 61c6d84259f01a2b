"""Training quality per storage option: an MLP classifier trained on scikit-learn's
handwritten digits, the same minibatches and steps for every option, several seeds."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj

# The data, the model and the loss of examples/digits_classifier.py, whose MLP is trained
# here wider (64 -> 256 -> 256 -> 10) with each storage option.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from digits_classifier import init_mlp, load_digits, logits_fn, loss_fn  # noqa: E402

SIZES = (64, 256, 256, 10)


def train(tx, seed, train_set, test_set, steps, batch, every):
    (x, y), (x_test, y_test) = train_set, test_set
    x, y, x_test, y_test = map(jnp.asarray, (x, y, x_test, y_test))
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch // len(x)) + 1
    order = np.concatenate([rng.permutation(len(x)) for _ in range(epochs)])
    batches = jnp.asarray(order[: steps * batch].reshape(steps // every, every, batch))
    params = init_mlp(jax.random.key(seed), SIZES)

    def step(carry, index):
        p, s = carry
        g = jax.grad(loss_fn)(p, x[index], y[index])
        return rj.update_and_apply(tx, g, s, p), None

    def chunk(carry, indices):
        carry, _ = jax.lax.scan(step, carry, indices)
        return carry, loss_fn(carry[0], x, y)

    @jax.jit
    def run(params):
        (params, _), losses = jax.lax.scan(chunk, (params, tx.init(params)), batches)
        accuracy = jnp.mean(jnp.argmax(logits_fn(params, x_test), axis=1) == y_test)
        return losses, accuracy

    losses, accuracy = run(params)
    curve = np.concatenate([[float(loss_fn(params, x, y))], np.asarray(losses)])
    return curve, float(accuracy)


def measure_quality(opts, steps, seeds, batch=64, every=25):
    train_set, test_set = load_digits()
    results = {}
    for name, _, _, tx in opts:
        curves, accuracies = [], []
        for seed in range(seeds):
            curve, accuracy = train(tx, seed, train_set, test_set, steps, batch, every)
            curves.append(curve)
            accuracies.append(accuracy)
        results[name] = (np.stack(curves), np.array(accuracies))
        final = np.stack(curves)[:, -1]
        print(f"  {name:<28} final loss {final.mean():.5f}  accuracy {np.mean(accuracies):.4f}")
    return results
