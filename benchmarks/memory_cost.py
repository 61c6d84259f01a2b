"""What each storage option costs on a realistic pytree (a 50,000 x 64 embedding table and
an MLP): the bytes of its state, and the time of one jitted, donated step."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from alternating import median_seconds, step_runner

import rmsjax as rj


def realistic_params(key):
    keys = jax.random.split(key, 4)
    sizes = [64, 512, 512, 10]
    mlp = [
        {
            "w": jax.random.normal(k, (a, b)) / math.sqrt(a),
            "b": jnp.zeros(b),
        }
        for k, a, b in zip(keys[1:], sizes[:-1], sizes[1:], strict=True)
    ]
    return {"embedding": jax.random.normal(keys[0], (50_000, 64)) * 0.01, "mlp": mlp}


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)


def measure_memory(opts, params):
    count = sum(x.size for x in jax.tree.leaves(params))
    table = params["embedding"]
    rows = []
    for name, _, moments, tx in opts:
        state = tx.init(params)
        total = state_bytes(state)
        table_state = tx.init({"embedding": table})
        rows.append(
            {
                "name": name,
                "bytes": total,
                "per_param": total / count,
                "per_moment": total / count / moments,
                "table_per_param": state_bytes(table_state) / table.size,
            }
        )
    return count, rows


def measure_speed(opts, params, rounds):
    """{name: (median step seconds, compile + first step seconds)}, the options' steps
    called in turn (see ``alternating.median_seconds``)."""
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype), params)
    runners, compile_s = {}, {}
    for name, _, _, tx in opts:
        step = jax.jit(
            lambda p, s, g, tx=tx: rj.update_and_apply(tx, g, s, p), donate_argnums=(0, 1)
        )
        p = jax.tree.map(jnp.copy, params)
        run = step_runner(step, p, tx.init(p), grads)
        t0 = time.perf_counter()
        run()
        compile_s[name] = time.perf_counter() - t0
        runners[name] = run
    medians = median_seconds(runners, rounds)
    return {name: (medians[name], compile_s[name]) for name in runners}
