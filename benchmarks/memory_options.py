"""The storage options ``memory.py`` compares: RMSprop (with and without momentum) and
Adagrad with float32, bfloat16 and int8 state, row-wise Adagrad and factored RMSprop, each
with the float32 baseline of its family."""

from __future__ import annotations

import rmsjax as rj


def options(steps=1000, lr_rms=1e-3, lr_momentum=3e-4, lr_adagrad=3e-2):
    """(name, family baseline, moments kept per parameter, constructor); learning rates
    follow a cosine decay to zero over ``steps``."""
    lr_rms, lr_momentum, lr_adagrad = (
        rj.schedules.cosine_decay_schedule(lr, steps) for lr in (lr_rms, lr_momentum, lr_adagrad)
    )
    out = []
    for storage in [None, "bfloat16", "int8"]:
        label = storage or "float32"
        out.append(
            (f"rmsprop [{label}]", "rmsprop [float32]", 1, rj.rmsprop(lr_rms, storage=storage))
        )
    for storage in [None, "bfloat16", "int8"]:
        label = storage or "float32"
        out.append(
            (
                f"rmsprop+momentum [{label}]",
                "rmsprop+momentum [float32]",
                2,
                rj.rmsprop(lr_momentum, momentum=0.9, storage=storage),
            )
        )
    for storage in [None, "bfloat16", "int8"]:
        label = storage or "float32"
        out.append(
            (f"adagrad [{label}]", "adagrad [float32]", 1, rj.adagrad(lr_adagrad, storage=storage))
        )
    out.append(("rowwise_adagrad", "adagrad [float32]", 1, rj.rowwise_adagrad(lr_adagrad)))
    out.append(("factored_rmsprop", "rmsprop [float32]", 1, rj.factored_rmsprop(lr_rms)))
    return out
