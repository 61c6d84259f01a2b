"""Presets that reproduce PyTorch, Keras 3 and TensorFlow 1 optimizers step for step,
with the peers' own argument names and defaults (see docs/porting.md)."""

from rmsjax._src.compat.keras import keras_adagrad as keras_adagrad
from rmsjax._src.compat.keras import keras_rmsprop as keras_rmsprop
from rmsjax._src.compat.parts import DecoupledWeightDecayState as DecoupledWeightDecayState
from rmsjax._src.compat.parts import decoupled_weight_decay as decoupled_weight_decay
from rmsjax._src.compat.parts import inverse_time_decay as inverse_time_decay
from rmsjax._src.compat.pytorch import torch_adagrad as torch_adagrad
from rmsjax._src.compat.pytorch import torch_rmsprop as torch_rmsprop
from rmsjax._src.compat.tf1 import tf1_adagrad as tf1_adagrad
from rmsjax._src.compat.tf1 import tf1_rmsprop as tf1_rmsprop

__all__ = [
    "DecoupledWeightDecayState",
    "decoupled_weight_decay",
    "inverse_time_decay",
    "keras_adagrad",
    "keras_rmsprop",
    "tf1_adagrad",
    "tf1_rmsprop",
    "torch_adagrad",
    "torch_rmsprop",
]
