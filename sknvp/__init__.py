"""sknvp: scikit-learn density estimation with Real-NVP normalizing flows.

:class:`RealNVPDensity` is the entry point for tabular data, :class:`RealNVPImageDensity`
(the paper's multi-scale architecture) for images. The torch layer underneath
(:mod:`sknvp.masks`, :mod:`sknvp.nets`, :mod:`sknvp.transforms`, :mod:`sknvp.mixture`,
:mod:`sknvp.em`, :mod:`sknvp.kernel`, :mod:`sknvp.power`, :mod:`sknvp.flows`,
:mod:`sknvp.multiscale`) does not import scikit-learn
and can be used on its own; :mod:`sknvp.datasets` holds the 2-D data sets with their exact
densities.
"""

from . import datasets, em, flows, kernel, masks, mixture, multiscale, nets, power, transforms
from ._density import RealNVPDensity
from ._image import RealNVPImageDensity, dequantized_bits_per_dim

__version__ = "0.1.0"

__all__ = [
    "RealNVPDensity",
    "RealNVPImageDensity",
    "__version__",
    "datasets",
    "dequantized_bits_per_dim",
    "em",
    "flows",
    "kernel",
    "masks",
    "mixture",
    "multiscale",
    "nets",
    "power",
    "transforms",
]
