"""A check shared by the modules that compare rmsjax with optax live."""

from __future__ import annotations

import jax
import numpy as np
import optax

import rmsjax as rj


def same_trajectory(ours, theirs, params, grads, *, jit=True):
    """Asserts bit-identical updates, parameters and dtypes at every step of ``grads``;
    returns both final states."""
    ours_update = jax.jit(ours.update) if jit else ours.update
    theirs_update = jax.jit(theirs.update) if jit else theirs.update
    p1, s1 = params, ours.init(params)
    p2, s2 = params, theirs.init(params)
    for step, g in enumerate(grads):
        u1, s1 = ours_update(g, s1, p1)
        u2, s2 = theirs_update(g, s2, p2)
        p1, p2 = rj.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for a, b in zip(jax.tree.leaves((u1, p1)), jax.tree.leaves((u2, p2))):
            assert a.dtype == b.dtype, f"step {step}: {a.dtype} vs {b.dtype}"
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {step}")
    return s1, s2
