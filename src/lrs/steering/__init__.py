"""Stage 3: steering methods. ``Steerer`` is the public base class; every method is registered in ``registry``.

- :mod:`lrs.steering.base`: :class:`Steerer` (``apply()`` around plain ``model.generate``, per-row stats)
- :mod:`lrs.steering.latent`: :class:`LatentRewardSteerer` (LRS, LRS basic, matched random control)
- :mod:`lrs.steering.vectors`: :class:`SteeringVectors` (diffmean; RL-trained vectors share the artefact)
- :mod:`lrs.steering.registry`: :data:`METHODS`, the one list the CLI, tune, report and demo read
"""

from lrs.steering.base import Steerer
from lrs.steering.latent import Gate, LatentRewardSteerer, SteerConfig, check_model, check_pair
from lrs.steering.registry import METHODS, TEST_METHODS, Method, get_method
from lrs.steering.vectors import DiffMeanSteerer, SteeringVectors

__all__ = [
    "Steerer",
    "Gate",
    "LatentRewardSteerer",
    "SteerConfig",
    "check_model",
    "check_pair",
    "METHODS",
    "TEST_METHODS",
    "Method",
    "get_method",
    "DiffMeanSteerer",
    "SteeringVectors",
]
