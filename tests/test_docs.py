"""The documentation stays complete and its claims stay true.

Checks that every public name is in the API reference, that every gallery example has the
header sphinx-gallery needs, and that statements made in the user guide (the pipeline offset,
the state_dict recipe, the one-feature model) hold for the code as it is.
"""

import ast
import importlib
import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sknvp import RealNVPDensity
from sknvp.flows import build_realnvp
from sknvp.mixture import GaussianMixtureBase

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
PUBLIC_MODULES = [
    "sknvp",
    "sknvp.datasets",
    "sknvp.study",
    "sknvp.masks",
    "sknvp.nets",
    "sknvp.transforms",
    "sknvp.flows",
    "sknvp.multiscale",
    "sknvp.power",
]
NOT_DOCUMENTED = {"__version__"}
TINY = {"n_couplings": 2, "hidden_layer_sizes": (8,), "max_iter": 3, "early_stopping": False,
            "random_state": 0, "device": "cpu"}


def _api_entries():
    """Names listed in docs/api.rst autosummary tables, per ``currentmodule``."""
    entries, module, in_table = {}, None, False
    for line in (DOCS / "api.rst").read_text().splitlines():
        if line.startswith(".. currentmodule::"):
            module = line.split("::")[1].strip()
        elif line.startswith(".. autosummary::"):
            in_table = True
        elif in_table and line.strip() and not line.startswith(" "):
            in_table = False
        elif in_table and re.fullmatch(r" {3}\w+", line):
            entries.setdefault(module, set()).add(line.strip())
    return entries


@pytest.fixture(autouse=True)
def _quiet_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    module = importlib.import_module(module_name)
    documented = _api_entries().get(module_name, set())
    # Submodules re-exported by the package have their own sections.
    names = {n for n in module.__all__ if not inspect.ismodule(getattr(module, n))}
    missing = names - NOT_DOCUMENTED - documented
    assert not missing, f"add to docs/api.rst under {module_name}: {sorted(missing)}"


def test_api_reference_lists_only_existing_names():
    for module_name, names in _api_entries().items():
        module = importlib.import_module(module_name)
        stale = [n for n in names if not hasattr(module, n)]
        assert not stale, f"docs/api.rst lists names {module_name} does not have: {stale}"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("plot_*.py")), ids=lambda p: p.name)
def test_gallery_example_has_a_titled_docstring(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert docstring, f"{path.name} needs a module docstring (sphinx-gallery header)"
    lines = docstring.strip("\n").splitlines()
    if set(lines[0]) == {"="}:  # overlined title: the overline must match the underline
        assert lines[0] == lines[2], f"{path.name}: title overline and underline differ"
        lines = lines[1:]
    title, under = lines[0], lines[1]
    assert title.strip() and set(under) == {"="}, f"{path.name}: needs an = underlined title"
    assert len(under) >= len(title), f"{path.name}: title underline too short"


def test_pipeline_offset_is_the_log_scale_sum():
    """docs/user_guide/densities.rst: a scaler in a pipeline shifts log-densities by
    sum(log(scale_)), and correcting by it recovers the flow fitted on raw data."""
    X = np.random.RandomState(0).randn(120, 3) * [0.01, 1.0, 300.0] + [5.0, 0.0, -40.0]
    params = dict(TINY, dtype="float64")
    flow = RealNVPDensity(**params).fit(X)
    pipe = make_pipeline(StandardScaler(), RealNVPDensity(**params)).fit(X)
    offset = np.log(pipe[0].scale_).sum()
    assert abs(offset) > 1.0  # the trap is not a rounding error
    np.testing.assert_allclose(pipe.score_samples(X) - offset, flow.score_samples(X),
                               atol=1e-6)


@pytest.mark.parametrize("whiten", [False, True])
def test_state_dict_recipe_of_the_persistence_page(tmp_path, whiten):
    """docs/user_guide/persistence.rst: rebuild with build_realnvp, load the weights."""
    X = np.random.RandomState(1).randn(100, 3) * [1.0, 10.0, 100.0]
    flow = RealNVPDensity(**{**TINY, "n_couplings": 3, "mask": "random", "whiten": whiten}).fit(X)
    torch.save(flow.module_.state_dict(), tmp_path / "flow_weights.pt")
    state = torch.load(tmp_path / "flow_weights.pt")
    masks = torch.stack([v for k, v in state.items() if k.endswith(".mask")])
    base = None
    if "base.means" in state:
        base = GaussianMixtureBase.placeholder(*state["base.means"].shape)
    module = build_realnvp(
        n_features=flow.n_features_in_,
        n_couplings=flow.n_couplings,
        hidden_layer_sizes=flow.hidden_layer_sizes,
        activation=flow.activation,
        mask=masks,
        batch_norm=flow.batch_norm,
        scale_bound=flow.scale_bound,
        loc=torch.zeros(flow.n_features_in_, dtype=torch.float64),
        scale=torch.ones(flow.n_features_in_, dtype=torch.float64),
        whitening=torch.eye(flow.n_features_in_, dtype=torch.float64) if flow.whiten_ else None,
        base=base,
    ).double()
    module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        log_p = module.log_prob(torch.as_tensor(X, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(log_p, flow.score_samples(X), rtol=0, atol=1e-10)


def test_one_feature_model_is_gaussian_on_a_normal_base():
    """docs/user_guide/flows.rst: with one feature every coupling is affine, so on a standard
    normal base the log-density is a quadratic in x (a Gaussian), even for bimodal data;
    the mixture base fits both modes."""
    rng = np.random.RandomState(0)
    X = np.r_[rng.randn(100) - 3.0, rng.randn(100) + 3.0][:, None]
    flow = RealNVPDensity(**{**TINY, "n_couplings": 4, "max_iter": 10, "base": "normal"}).fit(X)
    grid = np.linspace(-6.0, 6.0, 25)[:, None]
    second_diff = np.diff(flow.score_samples(grid), 2)
    np.testing.assert_allclose(second_diff, second_diff[0], rtol=1e-6)
    assert second_diff[0] < 0
    mixture = RealNVPDensity(**{**TINY, "n_couplings": 4, "max_iter": 10}).fit(X)
    assert mixture.n_components_ == 2
    at = mixture.score_samples(np.array([[-3.0], [0.0], [3.0]]))
    assert at[0] > at[1] + 2 and at[2] > at[1] + 2  # two modes, a trough between them
