"""Data-parallel training with rmsjax: one device, 8 devices, 2 processes; same numbers.

A small MLP regression is trained with RMSprop and momentum four ways:

* ``one device``: the plain jitted step;
* ``replicated``: 8 devices, each with a slice of every batch, parameters and optimizer
  state replicated (``jax.jit`` with shardings; the compiler all-reduces the gradients);
* ``ZeRO-1``: the same, but the optimizer state is split over the 8 devices
  (:func:`rmsjax.shard_state`, :func:`rmsjax.zero1_update_and_apply`), so each device
  keeps 1/8 of it;
* ``shard_map``: the data-parallel step written per device with ``jax.shard_map`` and a
  ``pmean`` of the gradients.

It prints, for each, how far its parameters end from the one-device run, the final loss
and the optimizer-state bytes each device holds. The batch mean is summed in another order
on 8 devices, so the parameters agree to float32 rounding, not bit for bit.

Usage::

    python examples/data_parallel.py               # 8 CPU devices in one process
    python examples/data_parallel.py --quick       # a smoke run of a few seconds
    python examples/data_parallel.py --processes 2 # 2 processes x 4 devices, localhost
    python examples/data_parallel.py --out r.npz   # also save every run's parameters

On CPU the script asks XLA for 8 host devices (``--xla_force_host_platform_device_count``)
before importing jax. With ``--processes 2`` it starts two copies of itself that meet
through ``jax.distributed.initialize`` on 127.0.0.1 and use gloo for CPU collectives; the
8 devices then span both processes, and each process also runs the one-device reference
on a device of its own.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

DEVICES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--processes", type=int, default=1, help="processes on localhost")
    parser.add_argument("--out", default=None, help="save the final parameters (.npz)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="with --processes 2: seconds each process may take to start and run",
    )
    # Set by the launcher for each process it starts.
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1 or DEVICES % args.processes:
        parser.error(f"--processes must be at least 1 and divide {DEVICES}, got {args.processes}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> int:
    """Starts ``args.processes`` copies of this script that form one JAX cluster."""
    coordinator = f"127.0.0.1:{free_port()}"
    base = [sys.executable, os.path.abspath(__file__), "--coordinator", coordinator]
    base += ["--processes", str(args.processes), "--timeout", str(args.timeout)]
    if args.quick:
        base.append("--quick")
    if args.steps is not None:
        base += ["--steps", str(args.steps)]
    if args.out:
        base += ["--out", args.out]
    children = [
        subprocess.Popen(
            [*base, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(args.processes)
    ]
    status = 0
    for i, child in enumerate(children):
        try:
            output, _ = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
            output, _ = child.communicate()
            print(f"process {i} timed out after {args.timeout:.0f} s", file=sys.stderr)
            child.returncode = 124
        if i == 0 or child.returncode:
            print(output, end="")
        if child.returncode:
            print(f"process {i} exited with status {child.returncode}", file=sys.stderr)
            status = status or child.returncode
    return status


def main(args: argparse.Namespace) -> int:
    local_devices = DEVICES // args.processes
    flag = f"--xla_force_host_platform_device_count={local_devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsjax as rj

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=int(args.timeout),
        )
    if jax.device_count() != DEVICES:
        print(f"need {DEVICES} devices, found {jax.devices()}", file=sys.stderr)
        return 2
    steps = (6 if args.quick else 200) if args.steps is None else args.steps
    batch = 64

    # The problem: identical on every process (the same seed), made into global arrays.
    rng = np.random.default_rng(0)
    init = {
        "w1": rng.standard_normal((32, 128)).astype(np.float32) / np.sqrt(32),
        "b1": np.zeros(128, np.float32),
        "w2": rng.standard_normal((128, 16)).astype(np.float32) / np.sqrt(128),
        "b2": np.zeros(16, np.float32),
    }
    teacher = rng.standard_normal((32, 16)).astype(np.float32) / np.sqrt(32)
    xs = rng.standard_normal((steps, batch, 32)).astype(np.float32)
    ys = np.tanh(xs @ teacher)

    tx = rj.rmsprop(3e-3, momentum=0.9)

    def loss_fn(params, x, y):
        hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
        return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params, state = rj.update_and_apply(tx, grads, state, params)
        return params, state, loss

    results: dict[str, tuple] = {}

    # 1. One device (each process uses one of its own devices).
    device = jax.local_devices()[0]
    params = jax.device_put(init, device)
    state = tx.init(params)
    one_step = jax.jit(step, donate_argnums=(0, 1))
    for x, y in zip(xs, ys, strict=True):
        params, state, loss = one_step(params, state, jax.device_put(x, device), y)
    results["one device"] = (params, state, loss)

    # The mesh: 8 devices on one axis, "data"; every batch is split over it.
    mesh = jax.make_mesh((DEVICES,), ("data",))
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P("data"))

    def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    param_shardings = jax.tree.map(lambda _: replicated, init)
    # Note: with 8 simulated devices on few CPU cores, XLA's CPU collectives can run out of
    # threads when several steps are queued at once (a rendezvous timeout); waiting for
    # each step's loss keeps one step in flight. Real accelerators do not need this.
    batches = [
        (global_array(x, split), global_array(y, split)) for x, y in zip(xs, ys, strict=True)
    ]

    # 2. Replicated: parameters and state on every device, batches split.
    params = jax.tree.map(lambda a: global_array(a, replicated), init)
    state = tx.init(params)  # laid out like the parameters: replicated
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    replicated_step = jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, split, split),
        out_shardings=(param_shardings, state_shardings, replicated),
        donate_argnums=(0, 1),
    )
    with jax.set_mesh(mesh):
        for x, y in batches:
            params, state, loss = replicated_step(params, state, x, y)
            loss.block_until_ready()  # one step in flight: see the note above
    results["replicated"] = (params, state, loss)

    # 3. ZeRO-1: parameters replicated, optimizer state split over "data".
    def zero1_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params, state = rj.zero1_update_and_apply(tx, grads, state, params, mesh, "data")
        return params, state, loss

    params = jax.tree.map(lambda a: global_array(a, replicated), init)
    state = rj.shard_state(tx.init(params), mesh, "data")
    state_shardings = rj.zero1_shardings(state, mesh, "data")
    sharded_step = jax.jit(
        zero1_step,
        in_shardings=(param_shardings, state_shardings, split, split),
        out_shardings=(param_shardings, state_shardings, replicated),
        donate_argnums=(0, 1),
    )
    with jax.set_mesh(mesh):
        for x, y in batches:
            params, state, loss = sharded_step(params, state, x, y)
            loss.block_until_ready()  # one step in flight: see the note above
    results["ZeRO-1"] = (params, state, loss)

    # 4. shard_map: the same data-parallel step, written for one device's shard. The loss
    # is the mean over all devices (pmean); its gradient with respect to the replicated
    # parameters is then the same on every device (JAX inserts the psum), and each device
    # runs the same optimizer step on it.
    def per_device_step(params, state, x, y):
        def global_loss(params):
            return jax.lax.pmean(loss_fn(params, x, y), "data")

        loss, grads = jax.value_and_grad(global_loss)(params)
        params, state = rj.update_and_apply(tx, grads, state, params)
        return params, state, loss

    params = jax.tree.map(lambda a: global_array(a, replicated), init)
    state = tx.init(params)
    mapped_step = jax.jit(
        jax.shard_map(
            per_device_step,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
        ),
        donate_argnums=(0, 1),
    )
    for x, y in batches:
        params, state, loss = mapped_step(params, state, x, y)
        loss.block_until_ready()
    results["shard_map"] = (params, state, loss)

    # Compare with the one-device run, on this process's copy of the parameters.
    def local(tree):
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)

    reference = local(results["one device"][0])
    print(
        f"{jax.process_count()} process(es), {jax.device_count()} devices "
        f"({jax.local_device_count()} here), {steps} steps of RMSprop + momentum, batch {batch}"
    )
    print(f"{'run':<12} {'max |params - one device|':>26} {'loss':>10} {'state B/device':>15}")
    same = True
    saved = {}
    for name, (params, state, loss) in results.items():
        mine = local(params)
        gap = max(float(np.max(np.abs(mine[k] - reference[k]))) for k in reference)
        scale = max(float(np.max(np.abs(reference[k]))) for k in reference)
        same &= gap <= 1e-5 * max(scale, 1.0)
        held = max(rj.bytes_per_device(state).values())
        print(f"{name:<12} {gap:>26.2e} {float(local(loss)):>10.5f} {held:>15,d}")
        saved.update({f"{name}/{k}": v for k, v in mine.items()})
    print(f"same parameters as one device: {'yes' if same else 'NO'}")
    if args.out and jax.process_index() == 0:
        np.savez(args.out, **saved)
    if args.processes > 1:
        jax.distributed.shutdown()
    return 0 if same else 1


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.processes > 1 and arguments.process_id is None:
        sys.exit(launch(arguments))
    sys.exit(main(arguments))
