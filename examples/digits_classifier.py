"""A digit classifier trained with four optimizers: loss and accuracy curves.

scikit-learn ships the handwritten digits data set (1797 images of 8x8 pixels, 10
classes), so this runs offline. A small multilayer perceptron in plain JAX is trained
with SGD, Adagrad, RMSprop and RMSprop with momentum, each inside the chain a real
training loop uses::

    rj.chain(
        rj.clip_by_global_norm(1.0),                      # tame rare large gradients
        rj.add_decayed_weights(1e-4, mask=weights_only),  # no decay on biases
        optimizer,
    )

A progress bar (tqdm, if installed) shows each epoch; the script prints a table of the
final test accuracy and writes ``digits_curves.png`` with training loss and test
accuracy per epoch.

Usage::

    python examples/digits_classifier.py [--quick] [--epochs N] [--out out/digits_classifier]

Needs scikit-learn (``pip install -e ".[examples]"`` in a checkout).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj


def load_digits(seed: int = 0):
    """Pixels scaled to [0, 1]; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = np.asarray(data.data, np.float32) / 16.0
    y = np.asarray(data.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def init_mlp(key, sizes=(64, 128, 10)) -> list[dict]:
    layers = []
    keys = jax.random.split(key, len(sizes) - 1)
    for layer_key, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        w = jax.random.normal(layer_key, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        layers.append({"w": w, "b": jnp.zeros(fan_out)})
    return layers


def logits_fn(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = logits_fn(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def weights_only(params):
    """The weight-decay mask: matrices yes, bias vectors no."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def optimizers() -> dict[str, rj.GradientTransformation]:
    return {
        "sgd": rj.sgd(0.05),
        "adagrad": rj.adagrad(0.05),
        "rmsprop": rj.rmsprop(1e-3),
        "rmsprop+momentum": rj.rmsprop(3e-4, momentum=0.9),
    }


def progress(iterable, description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=False, ncols=90)


def train(name, optimizer, train_set, test_set, epochs, batch_size=64, seed=0):
    tx = rj.chain(
        rj.clip_by_global_norm(1.0),
        rj.add_decayed_weights(1e-4, mask=weights_only),
        optimizer,
    )
    params = init_mlp(jax.random.key(seed))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state, loss

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(logits_fn(params, x), axis=1) == y)

    (x_train, y_train), (x_test, y_test) = train_set, test_set
    rng = np.random.default_rng(seed)
    history = {"loss": [], "accuracy": []}
    bar = progress(range(epochs), f"{name:>16}")
    for _ in bar:
        order = rng.permutation(len(x_train))
        losses = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            params, state, loss = step(params, state, x_train[rows], y_train[rows])
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["accuracy"].append(float(accuracy(params, x_test, y_test)))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{history['accuracy'][-1]:.3f}")
    return history


COLORS = {
    "sgd": "tab:red",
    "adagrad": "tab:green",
    "rmsprop": "tab:blue",
    "rmsprop+momentum": "tab:purple",
}


def plot(plt, histories, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for name, history in histories.items():
        epochs = np.arange(1, len(history["loss"]) + 1)
        left.semilogy(epochs, history["loss"], "-", color=COLORS[name], label=name)
        right.plot(epochs, history["accuracy"], "-", color=COLORS[name], label=name)
    left.set(xlabel="epoch", ylabel="training loss (log scale)", title="cross-entropy")
    right.set(xlabel="epoch", ylabel="test accuracy", title="accuracy on 360 held-out digits")
    # The accuracy axis spans every optimizer's curve, from its lowest point to its highest.
    accuracies = np.concatenate([history["accuracy"] for history in histories.values()])
    low, high = accuracies.min(), accuracies.max()
    pad = 0.05 * max(high - low, 0.01)
    right.set_ylim(low - pad, min(high + pad, 1.005))
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("scikit-learn digits, MLP 64-128-10, batch 64, global-norm clip 1, decay 1e-4")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs (default 30, or 2 with --quick)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/digits_classifier"),
        help="folder for its pictures (default out/digits_classifier)",
    )
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    epochs = (2 if args.quick else 30) if args.epochs is None else args.epochs
    began = time.perf_counter()

    train_set, test_set = load_digits()
    print(f"{len(train_set[0])} training and {len(test_set[0])} test images, {epochs} epochs")
    histories = {
        name: train(name, tx, train_set, test_set, epochs) for name, tx in optimizers().items()
    }
    print(f"\n{'optimizer':<18}{'final loss':>12}{'test accuracy':>15}")
    for name, history in histories.items():
        print(f"{name:<18}{history['loss'][-1]:>12.4f}{history['accuracy'][-1]:>15.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(plt, histories, args.out / "digits_curves.png")
        print(f"wrote {args.out / 'digits_curves.png'}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return histories


if __name__ == "__main__":
    main()
