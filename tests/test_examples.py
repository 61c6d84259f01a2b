"""Smoke runs of every example (``--quick``), checking what each prints and writes.

Examples that need the ``examples`` extra (scikit-learn, flax, equinox, orbax) are
skipped with a reason when it is not installed; CI installs it, so they run there.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Runs every example script: outside the quick loop.
pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str):
    """Imports examples/NAME.py as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_pngs(folder: pathlib.Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{path} was not written"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f"{path} is not a real picture"


@pytest.fixture(autouse=True)
def _headless_matplotlib():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")


def test_quickstart_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for row in ["sgd", "adagrad", "rmsprop", "rmsprop+momentum", "elongated bowl", "Rosenbrock"]:
        assert row in result.stdout
    assert_pngs(tmp_path, ["trajectories.png", "loss_curves.png"])


def test_quickstart_claims_hold_on_the_full_run(tmp_path):
    # The full run takes a few seconds; its numbers back the README's captions.
    losses = load("quickstart").main(["--out", str(tmp_path)])
    bowl, rosenbrock = losses["elongated bowl"], losses["Rosenbrock"]
    # RMSprop beats plain gradient descent on the elongated bowl by orders of magnitude.
    assert bowl["rmsprop"][-1] < 1e-3 * bowl["sgd"][-1]
    # Adagrad keeps pace with RMSprop early (within 15% after 10 steps), then falls behind.
    assert abs(bowl["adagrad"][10] / bowl["rmsprop"][10] - 1) < 0.15
    assert bowl["adagrad"][-1] > 10 * bowl["rmsprop"][-1]
    assert rosenbrock["adagrad"][-1] > 10 * rosenbrock["rmsprop"][-1]
    # the README's caption of loss_curves.png quotes these figures of the bowl
    comparison = load("quickstart").adagrad_versus_rmsprop(bowl["adagrad"], bowl["rmsprop"])
    caption = (
        "within 10% of RMSprop's up to step 11, then falls behind as its sum of squared "
        "gradients grows: 2.1x RMSprop's at step 50, 21x at step 100"
    )
    assert caption in (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert comparison == (
        "Adagrad's loss within 10% of RMSprop's to step 11;\nthen 2.1x at step 50, 21x at step 100"
    )
    assert rosenbrock["rmsprop+momentum"][-1] < 1e-2
    assert_pngs(tmp_path, ["trajectories.png", "loss_curves.png"])


def test_quickstart_without_matplotlib_prints_the_table(tmp_path):
    code = (
        "import sys, runpy; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['quickstart.py', '--quick', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(EXAMPLES / 'quickstart.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "rmsprop+momentum" in result.stdout
    assert "pictures skipped" in result.stdout
    assert not list(tmp_path.glob("*.png"))


def test_step_sizes(tmp_path):
    result = load("step_sizes").main(["--quick", "--out", str(tmp_path)])
    assert result["slope"] < 0  # larger features, smaller steps
    losses, history, sizes = result["results"]["adagrad"]
    # Adagrad's step sizes never grow: its sum of squares only increases.
    assert np.all(np.diff(history["hidden"]["w"].max) <= 0)
    assert_pngs(tmp_path, ["step_sizes.png"])


def test_char_rnn(tmp_path):
    curves = load("char_rnn").main(["--quick", "--out", str(tmp_path)])
    assert set(curves) == {"sgd", "adagrad", "rmsprop"}
    for bits in curves.values():
        assert np.all(np.isfinite(bits))
    # sgd and rmsprop fall within the quick run's 10 steps; adagrad at its best rate of
    # the full run, 3, first moves every weight by about 3 (g / sqrt(g^2)) and overshoots
    for name in ("sgd", "rmsprop"):
        assert curves[name][-1] < curves[name][0]
    assert_pngs(tmp_path, ["char_rnn_loss.png"])


def test_digits_classifier(tmp_path):
    pytest.importorskip("sklearn")
    histories = load("digits_classifier").main(["--quick", "--epochs", "2", "--out", str(tmp_path)])
    for history in histories.values():
        assert history["loss"][-1] < history["loss"][0]
        assert history["accuracy"][-1] > 0.5  # ten classes: chance is 0.1
    assert_pngs(tmp_path, ["digits_curves.png"])


def test_flax_nnx(tmp_path):
    pytest.importorskip("flax")
    losses = load("flax_nnx").main(["--quick", "--out", str(tmp_path)])["losses"]
    assert losses[-1] < 0.5 * losses[0]
    assert_pngs(tmp_path, ["flax_nnx_fit.png"])


def test_equinox(tmp_path):
    pytest.importorskip("equinox")
    losses = load("equinox_mlp").main(["--quick", "--out", str(tmp_path)])["losses"]
    assert losses[-1] < 0.75 * losses[0]
    assert_pngs(tmp_path, ["equinox_fit.png"])


def test_orbax_resume_is_bit_identical(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    result = load("orbax_checkpoint").main(["--quick", "--out", str(tmp_path)])
    assert result["identical"]
    assert max(result["differences"]) == 0.0
    assert_pngs(tmp_path, ["orbax_resume.png"])


def test_nnx_optimizer_steps_like_functional_rmsjax():
    nnx = pytest.importorskip("flax.nnx")
    import jax
    import jax.numpy as jnp

    import rmsjax as rj

    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(1e-2, momentum=0.9))
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    plain = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = tx.init(plain)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def loss(p):
        return jnp.mean((x @ p["kernel"] + p["bias"]) ** 2)

    for _ in range(5):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        updates, state = tx.update(jax.grad(loss)(plain), state, plain)
        plain = rj.apply_updates(plain, updates)
    ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(ours["kernel"], plain["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours["bias"], plain["bias"], rtol=1e-6, atol=1e-7)


def _matrices(params):
    import jax

    return jax.tree.map(lambda p: p.ndim > 1, params)


NNX_OPTIMIZERS = {
    "int8 momentum": lambda rj: rj.rmsprop(1e-3, momentum=0.9, storage="int8"),
    "int8 adagrad": lambda rj: rj.adagrad(1e-2, storage="int8"),
    "bfloat16": lambda rj: rj.rmsprop(1e-3, storage="bfloat16"),
    "grouped": lambda rj: rj.grouped(rj.rmsprop(1e-3, momentum=0.9)),
    "grouped int8": lambda rj: rj.grouped(rj.rmsprop(1e-3, storage="int8")),
    # masked puts a MaskedNode inside each variable at init, where the gradients have it
    # bare: grouped compared the two structures and refused every step
    "masked grouped": lambda rj: rj.masked(rj.grouped(rj.adagrad(1e-2)), _matrices),
    "grouped in masked in chain": lambda rj: rj.chain(
        rj.clip_by_global_norm(1.0),
        rj.masked(rj.grouped(rj.rmsprop(1e-3, momentum=0.9)), _matrices),
    ),
}


@pytest.mark.parametrize("make", NNX_OPTIMIZERS.values(), ids=NNX_OPTIMIZERS.keys())
def test_nnx_optimizer_takes_low_precision_and_grouped_state(make):
    # nnx.Optimizer builds the state from variables (nnx.Param) and steps it with bare
    # arrays, and keeps a variable per array of the state: the steps must be those of
    # the functional optimizer on the same arrays, bit for bit.
    nnx = pytest.importorskip("flax.nnx")
    import jax
    import jax.numpy as jnp

    import rmsjax as rj

    model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))  # a kernel of 8192: int8 state
    tx = make(rj)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    plain = jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = tx.init(plain)
    x = jnp.linspace(-1.0, 1.0, 4 * 128).reshape(4, 128)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    @jax.jit
    def functional_step(p, state):
        grads = jax.grad(lambda p: jnp.mean((x @ p["kernel"] + p["bias"]) ** 2))(p)
        updates, state = tx.update(grads, state, p)
        return rj.apply_updates(p, updates), state

    for _ in range(3):
        train_step(model, optimizer)
        plain, state = functional_step(plain, state)
    ours = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(ours["kernel"], plain["kernel"])
    np.testing.assert_array_equal(ours["bias"], plain["bias"])


@pytest.mark.parametrize("make", NNX_OPTIMIZERS.values(), ids=NNX_OPTIMIZERS.keys())
def test_nnx_split_parameters_step_like_bare_arrays(make):
    # the functional nnx pattern: params from nnx.split hold nnx.Param variables, and
    # so do their gradients. An int8 slot stands in the variable's place in the state,
    # where the updates hold the variable: every step after init was refused as "the
    # tree structure of the updates differs from that of the state".
    nnx = pytest.importorskip("flax.nnx")
    import jax
    import jax.numpy as jnp

    import rmsjax as rj

    model = nnx.Linear(128, 65, rngs=nnx.Rngs(0))  # a kernel of 8320, not whole blocks
    graphdef, params = nnx.split(model, nnx.Param)
    plain = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    tx = make(rj)
    state, plain_state = tx.init(params), tx.init(plain)
    x = jnp.linspace(-1.0, 1.0, 4 * 128).reshape(4, 128)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    step = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))
    for _ in range(3):
        grads = jax.grad(loss)(params)
        plain_grads = jax.tree.map(jnp.asarray, nnx.to_pure_dict(grads))
        updates, _ = tx.update(grads, state, params)
        plain_updates, _ = tx.update(plain_grads, plain_state, plain)
        np.testing.assert_array_equal(updates["kernel"].get_value(), plain_updates["kernel"])
        params, state = step(grads, state, params)
        plain, plain_state = step(plain_grads, plain_state, plain)
    ours = jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
    np.testing.assert_array_equal(ours["kernel"], plain["kernel"])
    np.testing.assert_array_equal(ours["bias"], plain["bias"])
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


def test_equinox_filtered_model_keeps_state_only_for_arrays():
    eqx = pytest.importorskip("equinox")
    import jax

    import rmsjax as rj

    model = eqx.nn.MLP(2, 1, width_size=4, depth=1, key=jax.random.key(0))
    tx = rj.adagrad(0.1)
    state = tx.init(eqx.filter(model, eqx.is_array))
    arrays = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    sums = jax.tree.leaves(state[0].sum_of_squares)
    assert [a.shape for a in arrays] == [s.shape for s in sums]


@pytest.mark.parametrize(
    "name, argv",
    [
        ("char_rnn", ["--steps", "0"]),
        ("digits_classifier", ["--epochs", "-1"]),
        ("data_parallel", ["--processes", "0"]),
        ("data_parallel", ["--steps", "-2"]),
    ],
)
def test_examples_refuse_counts_below_one(name, argv, capsys):
    # --steps 0 ran the default, --epochs -1 and --processes 0 ended in tracebacks
    module = load(name)
    parse = module.parse_args if name == "data_parallel" else module.main
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
