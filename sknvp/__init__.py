"""sknvp: scikit-learn density estimation with Real-NVP normalizing flows.

The estimator :class:`RealNVPDensity` is the entry point. The torch layer underneath
(:mod:`sknvp.masks`, :mod:`sknvp.nets`, :mod:`sknvp.transforms`, :mod:`sknvp.flows`) does not
import scikit-learn and can be used on its own.
"""

from ._density import RealNVPDensity

__version__ = "0.1.0"

__all__ = ["RealNVPDensity", "__version__"]
