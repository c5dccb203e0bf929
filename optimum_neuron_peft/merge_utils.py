"""PEFT-compatible task-tensor merging kernels: the same functions, signatures and results as
``peft.utils.merge_utils``. The public name of `optimum_neuron_peft.merging.kernels` (see its doc for how they are
computed and the one deviation); the list of names is kept there, once.
"""

from .merging.kernels import *  # noqa: F403  (the public names, re-exported)
from .merging.kernels import __all__  # noqa: F401
