"""rmsjax: RMSprop, Adagrad and the rules they chain with, as optax-style gradient
transformations over JAX pytrees."""

import importlib.metadata as _metadata

from rmsjax import compat as compat
from rmsjax import schedules as schedules
from rmsjax._src.accumulation import AccumulateGradientsState as AccumulateGradientsState
from rmsjax._src.accumulation import accumulate_gradients as accumulate_gradients
from rmsjax._src.alias import adagrad as adagrad
from rmsjax._src.alias import rmsprop as rmsprop
from rmsjax._src.alias import sgd as sgd
from rmsjax._src.base import EmptyState as EmptyState
from rmsjax._src.base import GradientTransformation as GradientTransformation
from rmsjax._src.base import OptState as OptState
from rmsjax._src.base import Params as Params
from rmsjax._src.base import ScalarOrSchedule as ScalarOrSchedule
from rmsjax._src.base import Schedule as Schedule
from rmsjax._src.base import Storage as Storage
from rmsjax._src.base import Updates as Updates
from rmsjax._src.base import apply_updates as apply_updates
from rmsjax._src.base import with_extra_args_support as with_extra_args_support
from rmsjax._src.clipping import clip as clip
from rmsjax._src.clipping import clip_by_global_norm as clip_by_global_norm
from rmsjax._src.clipping import global_norm as global_norm
from rmsjax._src.combine import chain as chain
from rmsjax._src.combine import update_and_apply as update_and_apply
from rmsjax._src.diagnostics import StepSizeSummary as StepSizeSummary
from rmsjax._src.diagnostics import effective_step_sizes as effective_step_sizes
from rmsjax._src.diagnostics import step_size_summary as step_size_summary
from rmsjax._src.factored import ScaleByFactoredRmsState as ScaleByFactoredRmsState
from rmsjax._src.factored import factored_rmsprop as factored_rmsprop
from rmsjax._src.factored import scale_by_factored_rmsprop as scale_by_factored_rmsprop
from rmsjax._src.fusion import identity as identity
from rmsjax._src.grouped import GroupedState as GroupedState
from rmsjax._src.grouped import group_state as group_state
from rmsjax._src.grouped import grouped as grouped
from rmsjax._src.grouped import ungroup_state as ungroup_state
from rmsjax._src.guard import ApplyIfFiniteState as ApplyIfFiniteState
from rmsjax._src.guard import apply_if_finite as apply_if_finite
from rmsjax._src.hyperparams import inject_hyperparams as inject_hyperparams
from rmsjax._src.hyperparams_state import Hyperparams as Hyperparams
from rmsjax._src.hyperparams_state import InjectHyperparamsState as InjectHyperparamsState
from rmsjax._src.interop import as_optax as as_optax
from rmsjax._src.interop import from_optax_state as from_optax_state
from rmsjax._src.interop import to_optax_state as to_optax_state
from rmsjax._src.leaf_groups import auto_block_size as auto_block_size
from rmsjax._src.leaf_groups import leaf_blocks as leaf_blocks
from rmsjax._src.masking import MaskedState as MaskedState
from rmsjax._src.masking import masked as masked
from rmsjax._src.masks import MaskedNode as MaskedNode
from rmsjax._src.momentum import EmaState as EmaState
from rmsjax._src.momentum import TraceState as TraceState
from rmsjax._src.momentum import ema as ema
from rmsjax._src.momentum import trace as trace
from rmsjax._src.rms import ScaleByRmsState as ScaleByRmsState
from rmsjax._src.rms import scale_by_rms as scale_by_rms
from rmsjax._src.rowwise import ScaleByRowwiseRssState as ScaleByRowwiseRssState
from rmsjax._src.rowwise import rowwise_adagrad as rowwise_adagrad
from rmsjax._src.rowwise import scale_by_rowwise_rss as scale_by_rowwise_rss
from rmsjax._src.rss import ScaleByRssState as ScaleByRssState
from rmsjax._src.rss import scale_by_rss as scale_by_rss
from rmsjax._src.scaling import ScaleByLearningRateState as ScaleByLearningRateState
from rmsjax._src.scaling import scale as scale
from rmsjax._src.scaling import scale_by_learning_rate as scale_by_learning_rate
from rmsjax._src.sharding import state_shardings as state_shardings
from rmsjax._src.step import make_train_step as make_train_step
from rmsjax._src.storage import QuantizedArray as QuantizedArray
from rmsjax._src.storage import dequantize as dequantize
from rmsjax._src.storage import quantize as quantize
from rmsjax._src.weight_decay import add_decayed_weights as add_decayed_weights
from rmsjax._src.zero1 import bytes_per_device as bytes_per_device
from rmsjax._src.zero1 import shard_state as shard_state
from rmsjax._src.zero1 import zero1_shardings as zero1_shardings
from rmsjax._src.zero1 import zero1_update_and_apply as zero1_update_and_apply

try:
    __version__ = _metadata.version("rmsjax")
    """The installed version of rmsjax (``0.0.0+unknown`` in a source tree that is not
    installed)."""
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AccumulateGradientsState",
    "ApplyIfFiniteState",
    "EmaState",
    "EmptyState",
    "GradientTransformation",
    "GroupedState",
    "Hyperparams",
    "InjectHyperparamsState",
    "MaskedNode",
    "MaskedState",
    "OptState",
    "Params",
    "QuantizedArray",
    "ScalarOrSchedule",
    "ScaleByFactoredRmsState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ScaleByRowwiseRssState",
    "ScaleByRssState",
    "Schedule",
    "StepSizeSummary",
    "Storage",
    "TraceState",
    "Updates",
    "__version__",
    "accumulate_gradients",
    "adagrad",
    "add_decayed_weights",
    "apply_if_finite",
    "apply_updates",
    "as_optax",
    "auto_block_size",
    "bytes_per_device",
    "chain",
    "clip",
    "clip_by_global_norm",
    "compat",
    "dequantize",
    "effective_step_sizes",
    "from_optax_state",
    "ema",
    "factored_rmsprop",
    "global_norm",
    "group_state",
    "grouped",
    "identity",
    "inject_hyperparams",
    "leaf_blocks",
    "make_train_step",
    "masked",
    "quantize",
    "rmsprop",
    "rowwise_adagrad",
    "scale",
    "scale_by_factored_rmsprop",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rowwise_rss",
    "scale_by_rss",
    "schedules",
    "sgd",
    "shard_state",
    "state_shardings",
    "step_size_summary",
    "to_optax_state",
    "trace",
    "ungroup_state",
    "update_and_apply",
    "with_extra_args_support",
    "zero1_shardings",
    "zero1_update_and_apply",
]


def __getattr__(name: str) -> object:
    # optax's scale_by_factored_rms is Adafactor's scaling, another algorithm than
    # rmsjax's factored RMSprop: a ported script fails here, not with other numbers
    if name == "scale_by_factored_rms":
        raise AttributeError(
            "rmsjax has no scale_by_factored_rms: optax's is Adafactor's scaling (a decay "
            "that grows with the step count, the two largest axes factored), which rmsjax "
            "does not implement; chain optax.scale_by_factored_rms itself (rmsjax's chain "
            "takes it), or use rmsjax.scale_by_factored_rmsprop, RMSprop's constant decay "
            "with the last two axes factored (docs/porting.md)"
        )
    # optax keeps its schedules at its top level, rmsjax in rmsjax.schedules: a ported
    # script's optax.linear_schedule(...) is told where they are
    if name in schedules.__all__:
        raise AttributeError(
            f"module 'rmsjax' has no attribute {name!r}: rmsjax's schedules are in "
            f"rmsjax.schedules (rmsjax.schedules.{name})"
        )
    if name.endswith(("_schedule", "_schedules")):
        raise AttributeError(
            f"module 'rmsjax' has no attribute {name!r}: rmsjax's schedules are in "
            f"rmsjax.schedules ({', '.join(schedules.__all__)}); any function of the step "
            f"count is a schedule, so optax.{name}(...) can be passed as it is"
        )
    raise AttributeError(f"module 'rmsjax' has no attribute {name!r}")


# flax.serialization saves rmsjax's state types whenever flax is imported (nothing is
# imported here; see rmsjax/_src/flax_support.py)
from rmsjax._src import flax_support as _flax_support  # noqa: E402

_flax_support.install()
