r"""Presets that reproduce PyTorch, Keras 3 and TensorFlow 1 optimizers step for step.

The peers agree on what RMSprop and Adagrad are and disagree on the details: where
``eps`` goes (inside or outside the root), the accumulator's starting value, whether
the learning rate sits inside the momentum buffer, how weight decay couples, and
torch's ``lr_decay``. Each preset here takes its peer's own argument names and
defaults and is a chain of rmsjax's core rules, in the order that reproduces the
peer's arithmetic, plus two small parts the peers need and the core has no use for:

- :func:`decoupled_weight_decay`: Keras' ``p <- p - lr * wd * p`` before the step,
  with the (possibly scheduled) learning rate;
- :func:`inverse_time_decay`: torch Adagrad's ``lr / (1 + (t - 1) * lr_decay)``.

Each preset's chain has the same parts in the same places whatever its arguments; a
part the peer leaves out for these arguments (no momentum, no weight decay, no sign
flip) is held by :func:`rmsjax.identity`, whose state is empty. So the position of, say, the
second-moment state in the state tuple depends only on the preset, and every part is
an elementwise rule: the whole step (and with ``update_and_apply`` the parameter
update) runs in one pass over the pytree.
"""
