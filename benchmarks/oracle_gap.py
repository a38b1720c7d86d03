"""How close to the true density can any full-covariance estimator get on bench_compare's
Gaussian mixtures, from as many rows as the benchmark gives it?

An oracle is told which component drew every training row and the true mixture weights; it
fits each component's mean and full covariance to that component's own rows (maximum
likelihood, or scikit-learn's Ledoit-Wolf / OAS shrinkage). Its held-out mean
log-likelihood below the truth's is the price of estimating the covariances from that many
rows, which no estimator of the same model class avoids on average (issue 8's "within 0.05
nat of the truth" target; docs/benchmarks.md, "Reading").

    python benchmarks/oracle_gap.py            # 10-D and 50-D, 9,000 and 10,000 rows, 3 draws
    python benchmarks/oracle_gap.py --quick    # tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.covariance import OAS, LedoitWolf

HERE = Path(__file__).resolve().parent
ESTIMATORS = {"maximum likelihood": None, "Ledoit-Wolf": LedoitWolf, "OAS": OAS}


def _mixture_params(d: int):
    """The benchmark's own mixture (bench_compare._mixture_params), loaded from the script."""
    if "bench_compare" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_compare", HERE / "bench_compare.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_compare"]._mixture_params(d)


def _draw(weights, means, chols, n: int, rng: np.random.RandomState):
    k = rng.choice(len(weights), size=n, p=weights)
    z = rng.normal(size=(n, means.shape[1]))
    return k, means[k] + np.einsum("nij,nj->ni", chols[k], z)


def _mixture_log_density(X, weights, means, covs) -> np.ndarray:
    parts = [
        np.log(w) + multivariate_normal(m, c).logpdf(X)
        for w, m, c in zip(weights, means, covs, strict=True)
    ]
    return logsumexp(np.column_stack(parts), axis=1)


def oracle_gaps(d: int, n_train: int, n_test: int, seed: int) -> dict[str, float]:
    """Truth minus oracle, held-out mean log-likelihood, for each covariance estimator."""
    weights, means, covs = _mixture_params(d)
    chols = np.linalg.cholesky(covs)
    labels, X = _draw(weights, means, chols, n_train, np.random.RandomState(seed))
    _, X_test = _draw(weights, means, chols, n_test, np.random.RandomState(seed + 10_000))
    truth = _mixture_log_density(X_test, weights, means, covs).mean()
    gaps = {}
    for name, estimator in ESTIMATORS.items():
        fitted_means, fitted_covs = [], []
        for j in range(len(weights)):
            rows = X[labels == j]
            fitted_means.append(rows.mean(0))
            if estimator is None:
                fitted_covs.append(np.cov(rows, rowvar=False, bias=True))
            else:
                fitted_covs.append(estimator().fit(rows).covariance_)
        oracle = _mixture_log_density(X_test, weights, fitted_means, fitted_covs).mean()
        gaps[name] = float(truth - oracle)
    return gaps


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: checks the script runs")
    parser.add_argument("--dims", default="10,50", help="mixture dimensions (10 and/or 50)")
    parser.add_argument("--rows", default="9000,10000", help="training rows, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="draws, comma-separated")
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    n_test = 10_000
    if args.quick:
        dims, rows, seeds, n_test = [10], [2000], [0], 2000
    print("| mixture | training rows | draw | " + " | ".join(ESTIMATORS) + " |")
    print("|---|---|---|" + "---|" * len(ESTIMATORS))
    results = []
    for d in dims:
        for n in rows:
            for seed in seeds:
                gaps = oracle_gaps(d, n, n_test, seed)
                results.append({"d": d, "n_train": n, "seed": seed, **gaps})
                cells = " | ".join(f"{g:.3f}" for g in gaps.values())
                print(f"| {d}-D | {n} | {seed} | {cells} |", flush=True)
    return results


if __name__ == "__main__":
    main()
