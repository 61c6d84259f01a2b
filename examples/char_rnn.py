"""A character-level recurrent network, the setting where RMSprop made its name.

Hinton introduced RMSprop in his 2012 lecture for networks like this one, and Graves
(2013) trained his handwriting and text generators with it: recurrent gradients vary
by orders of magnitude between weights and between steps, and dividing each weight's
gradient by its own running RMS copes with that where one global learning rate does
not. Here a GRU in plain JAX learns to predict the next character of a few Shakespeare
sonnets (``examples/data/sonnets.txt``, public domain) with SGD, Adagrad and RMSprop, all
behind ``clip_by_global_norm`` (as RNNs are usually trained) and each with the best
learning rate of a small sweep, and the script writes
``char_rnn_loss.png`` (bits per character per step) and prints a sample from the
RMSprop model.

Usage::

    python examples/char_rnn.py [--quick] [--steps N] [--out out/char_rnn]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj

TEXT_PATH = pathlib.Path(__file__).parent / "data" / "sonnets.txt"


def load_text() -> tuple[np.ndarray, list[str]]:
    text = TEXT_PATH.read_text(encoding="utf-8")
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    return np.asarray([index[c] for c in text], np.int32), alphabet


def init_gru(key, vocab: int, hidden: int) -> dict:
    k_in, k_rec, k_out = jax.random.split(key, 3)
    return {
        # Input, recurrent and bias weights for the update, reset and candidate gates.
        "w_in": jax.random.normal(k_in, (vocab, 3 * hidden)) * 0.1,
        "w_rec": jax.random.normal(k_rec, (hidden, 3 * hidden)) / np.sqrt(hidden),
        "b": jnp.zeros(3 * hidden),
        "w_out": jax.random.normal(k_out, (hidden, vocab)) / np.sqrt(hidden),
        "b_out": jnp.zeros(vocab),
    }


def gru_cell(params, h, token):
    x = params["w_in"][token]  # one-hot input times a matrix = a row lookup
    hidden = h.shape[-1]
    recurrent = h @ params["w_rec"]
    z = jax.nn.sigmoid(x[..., :hidden] + recurrent[..., :hidden] + params["b"][:hidden])
    r = jax.nn.sigmoid(
        x[..., hidden : 2 * hidden]
        + recurrent[..., hidden : 2 * hidden]
        + params["b"][hidden : 2 * hidden]
    )
    n = jnp.tanh(
        x[..., 2 * hidden :] + r * recurrent[..., 2 * hidden :] + params["b"][2 * hidden :]
    )
    h = (1 - z) * n + z * h
    return h, h @ params["w_out"] + params["b_out"]


def sequence_loss(params, inputs, targets):
    """Mean cross-entropy in nats; inputs and targets are (batch, time) token ids."""
    hidden = params["w_rec"].shape[0]
    h0 = jnp.zeros((inputs.shape[0], hidden))
    _, logits = jax.lax.scan(lambda h, tok: gru_cell(params, h, tok), h0, inputs.T)
    log_probs = jax.nn.log_softmax(logits)  # (time, batch, vocab)
    picked = jnp.take_along_axis(log_probs, targets.T[..., None], axis=-1)
    return -jnp.mean(picked)


def optimizers() -> dict[str, rj.GradientTransformation]:
    def clipped(tx):
        return rj.chain(rj.clip_by_global_norm(1.0), tx)

    # Each learning rate is the best of a small sweep at 600 steps (bits per character
    # over the last 60 steps), each best between two worse rates: sgd 1 -> 2.70,
    # 3 -> 0.75, 10 -> 3.49; adagrad 0.1 -> 3.43, 0.3 -> 2.73, 1 -> 0.66, 3 -> 0.44,
    # 10 -> 8.63; rmsprop 1e-3 -> 2.48, 3e-3 -> 0.64, 1e-2 -> 0.32, 3e-2 -> 0.58.
    # Adagrad's first step moves every weight by about its rate (g / sqrt(g^2)): at 3 it
    # overshoots for its first hundred steps, above uniform guessing, then recovers.
    return {
        "sgd": clipped(rj.sgd(3.0)),
        "adagrad": clipped(rj.adagrad(3.0)),
        "rmsprop": clipped(rj.rmsprop(1e-2)),
    }


def train(tx, data, vocab, hidden, steps, batch, length, seed=0):
    params = init_gru(jax.random.key(seed), vocab, hidden)
    state = tx.init(params)
    data = jnp.asarray(data)

    @jax.jit
    def step(params, state, key):
        starts = jax.random.randint(key, (batch,), 0, data.shape[0] - length - 1)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (length + 1,)))(starts)
        loss, grads = jax.value_and_grad(sequence_loss)(params, windows[:, :-1], windows[:, 1:])
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state, loss

    losses = []
    for key in jax.random.split(jax.random.key(seed + 1), steps):
        params, state, loss = step(params, state, key)
        losses.append(loss)
    return params, np.asarray(losses) / np.log(2.0)  # bits per character


def sample(params, alphabet, prompt="Shall I ", length=200, temperature=0.6, seed=0):
    index = {c: i for i, c in enumerate(alphabet)}

    @jax.jit
    def generate(params, h, token, key):
        def step(carry, key):
            h, token = carry
            h, logits = gru_cell(params, h, token)
            token = jax.random.categorical(key, logits / temperature)
            return (h, token), token

        return jax.lax.scan(step, (h, token), jax.random.split(key, length))[1]

    h = jnp.zeros(params["w_rec"].shape[0])
    for c in prompt[:-1]:
        h, _ = gru_cell(params, h, index[c])
    tokens = generate(params, h, jnp.asarray(index[prompt[-1]]), jax.random.key(seed))
    return prompt + "".join(alphabet[int(t)] for t in tokens)


def smooth(values, window):
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


COLORS = {"sgd": "tab:red", "adagrad": "tab:green", "rmsprop": "tab:blue"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/char_rnn"),
        help="folder for its pictures (default out/char_rnn)",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    steps = (10 if args.quick else 600) if args.steps is None else args.steps
    hidden, batch, length = (32, 8, 16) if args.quick else (128, 32, 48)
    began = time.perf_counter()

    data, alphabet = load_text()
    print(f"{len(data)} characters, {len(alphabet)} distinct; GRU with {hidden} units")
    print(f"uniform guessing: {np.log2(len(alphabet)):.2f} bits per character\n")
    curves, models = {}, {}
    for name, tx in optimizers().items():
        models[name], curves[name] = train(tx, data, len(alphabet), hidden, steps, batch, length)
        last = max(1, steps // 10)
        steps_text = "the last step" if last == 1 else f"the last {last} steps"
        print(f"{name:<8} bits per character over {steps_text}: {curves[name][-last:].mean():.3f}")

    sampled = sample(models["rmsprop"], alphabet, length=40 if args.quick else 160)
    print("\nRMSprop model, sampled:\n" + sampled)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        window = max(1, steps // 30)
        for name, bits in curves.items():
            ax.plot(np.arange(len(bits)), bits, color=COLORS[name], alpha=0.2, lw=0.8)
            smoothed = smooth(bits, window)
            ax.plot(np.arange(len(smoothed)) + window - 1, smoothed, color=COLORS[name], label=name)
        ax.axhline(np.log2(len(alphabet)), color="0.5", ls=":", lw=1, label="uniform guess")
        ax.set(
            xlabel="step",
            ylabel="bits per character",
            title=f"char-level GRU ({hidden} units), training loss on Shakespeare's sonnets",
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = args.out / "char_rnn_loss.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        print(f"\nwrote {path}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return curves


if __name__ == "__main__":
    main()
