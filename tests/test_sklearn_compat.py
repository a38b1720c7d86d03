"""scikit-learn's own conformance suite on small, fast configurations."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sknvp import RealNVPDensity

TINY = dict(n_couplings=2, hidden_layer_sizes=(8,), max_iter=3, random_state=0, device="cpu")

ESTIMATORS = [
    RealNVPDensity(**TINY),
    RealNVPDensity(**TINY, batch_norm=True, mask="checkerboard", early_stopping=False),
    RealNVPDensity(**TINY, inference_dtype="float32"),  # the fast path passes them too
    RealNVPDensity(**TINY, power_transform="yeo-johnson"),  # the layer wherever it fits
]


def _expected_failures(estimator):
    # Fitting with integer sample weights must equal fitting on repeated rows. Minibatch SGD
    # with shuffling cannot promise that: repeating rows changes the number and content of the
    # minibatches (and the validation split), so the two fits follow different optimisation
    # paths. The weighted loss itself is exact (tested in test_density.py).
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "minibatch training: repeated rows change the batches, not just the weights"
        ),
    }


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failures)
def test_sklearn_compatible(estimator, check):
    check(estimator)
