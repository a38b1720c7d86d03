"""The only importer of scikit-learn private API (and any version shims)."""

from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_n_features, _check_sample_weight

__all__ = ["Interval", "StrOptions", "_fit_context", "check_n_features", "check_sample_weight"]


def check_sample_weight(sample_weight, X):  # noqa: ANN001, ANN201 - thin shim
    """Validate ``sample_weight`` against ``X`` (non-negative, one per row)."""
    return _check_sample_weight(sample_weight, X, ensure_non_negative=True)


def check_n_features(estimator, X) -> None:
    """Raise scikit-learn's error if ``X`` has not ``estimator.n_features_in_`` columns."""
    _check_n_features(estimator, X, reset=False)
