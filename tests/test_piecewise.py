"""One-input ReLU conditioners as piecewise-linear tables (sknvp.piecewise, MLP inference)."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from strategies import seeds

from sknvp import RealNVPDensity, datasets, nets
from sknvp.nets import MLP
from sknvp.piecewise import evaluate_table, is_piecewise_linear, piecewise_linear, use_tables


def _random_mlp(hidden, outputs, activation, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    net = MLP(1, outputs, hidden, activation).to(dtype)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                scale = layer.in_features ** -0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * scale)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    return net


def _direct(net, x):
    with torch.no_grad():
        return torch.nn.Sequential.forward(net, x)


@settings(max_examples=60, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    outputs=st.integers(1, 4),
    slope=st.sampled_from([0.0, 0.01, 0.3, -0.5]),
    seed=seeds,
)
def test_the_table_is_the_network(hidden, outputs, slope, seed):
    activation = (lambda: torch.nn.ReLU()) if slope == 0.0 else (
        lambda: torch.nn.LeakyReLU(slope)
    )
    net = _random_mlp(hidden, outputs, activation, seed)
    table = piecewise_linear(net)
    assert table is not None
    assert torch.all(table.breaks[1:] > table.breaks[:-1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([
        3.0 * torch.randn(500, 1, generator=gen, dtype=torch.float64),
        torch.tensor([[-1e3], [1e3], [0.0]], dtype=torch.float64),
        table.breaks[:, None],  # the kinks themselves
        table.breaks[:, None] + 1e-9,
    ])
    direct = _direct(net, x)
    scale = 1.0 + float(direct.abs().max())
    torch.testing.assert_close(evaluate_table(table, x), direct, rtol=0, atol=1e-10 * scale)


def test_float32_networks_and_rows_give_float32_outputs():
    net = _random_mlp((16, 16), 2, "relu", 0, dtype=torch.float32)
    table = piecewise_linear(net)
    assert table.values.dtype == torch.float64  # built in double precision
    x = torch.linspace(-4, 4, 1001, dtype=torch.float32)[:, None]
    out = evaluate_table(table.to(dtype=torch.float32), x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _direct(net, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP(1, 2, (8,), "tanh"),
        lambda: MLP(1, 2, (8,), "gelu"),
        lambda: MLP(2, 2, (8,), "relu"),
        lambda: torch.nn.Sequential(torch.nn.Linear(1, 4, bias=False), torch.nn.ReLU(),
                                    torch.nn.Linear(4, 2)),
        lambda: torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU()),
    ],
    ids=["tanh", "gelu", "two-inputs", "no-bias", "ends-in-activation"],
)
def test_other_networks_have_no_table(build):
    net = build()
    assert not is_piecewise_linear(net)
    assert piecewise_linear(net) is None


def test_too_many_pieces_give_no_table():
    net = _random_mlp((32, 32), 2, "relu", 0)
    assert piecewise_linear(net, max_pieces=4) is None


def test_mlp_inference_uses_the_table_and_follows_parameter_changes(monkeypatch):
    net = use_tables(_random_mlp((16, 16), 2, "relu", 1))
    calls = []
    real = nets.evaluate_table
    monkeypatch.setattr(nets, "evaluate_table", lambda t, x: calls.append(len(x)) or real(t, x))
    x = torch.linspace(-3, 3, 257, dtype=torch.float64)[:, None]
    with torch.no_grad():
        first = net(x)
    assert calls == [257]
    torch.testing.assert_close(first, _direct(net, x), rtol=0, atol=1e-12)
    with torch.no_grad():
        net[2].weight.add_(0.5)  # an in-place step, as an optimizer takes
        second = net(x)
    torch.testing.assert_close(second, _direct(net, x), rtol=0, atol=1e-12)
    assert not torch.allclose(first, second)
    net[2].weight = torch.nn.Parameter(net[2].weight.detach() * 2)  # a replaced tensor
    with torch.no_grad():
        torch.testing.assert_close(net(x), _direct(net, x), rtol=0, atol=1e-12)
    # With autograd on, the layers run (the table has no gradient to give).
    calls.clear()
    y = net(x.requires_grad_())
    y.sum().backward()
    assert calls == [] and x.grad is not None


def test_only_switched_on_networks_use_tables(monkeypatch):
    calls = []
    real = nets.evaluate_table
    monkeypatch.setattr(nets, "evaluate_table", lambda t, x: calls.append(len(x)) or real(t, x))
    net = _random_mlp((8,), 2, "relu", 2)
    x = torch.zeros(40, 1, dtype=torch.float64)
    with torch.no_grad():
        net(x)
        assert calls == []
        use_tables(net)
        net(x)
        assert calls == [40]
        use_tables(net, enabled=False)
        net(x)
        assert calls == [40] and "_piecewise_cache" not in net.__dict__


def test_tables_follow_a_fused_adam_step_that_keeps_version_counters():
    """torch's fused Adam kernel updates parameters in place without bumping their version
    counters: a cache keyed on versions alone served the old table after training steps
    (found as a benchmark fit whose validation scores stopped moving)."""
    net = use_tables(_random_mlp((16,), 2, "relu", 5, dtype=torch.float32))
    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
    x = torch.linspace(-3, 3, 101)[:, None]
    with torch.no_grad():
        before = net(x)
    versions = [p._version for p in net.parameters()]
    net(x).square().sum().backward()
    opt.step()
    assert [p._version for p in net.parameters()] == versions  # the kernel's behaviour
    with torch.no_grad():
        after = net(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _direct(net, x), rtol=1e-5, atol=1e-5)


def test_training_never_uses_tables(monkeypatch):
    """A fit runs its layers in every validation pass: the same fit as with tables unbuildable,
    down to the validation scores, after scoring has switched the fitted flow's tables on."""
    X = datasets.make_moons(3000, noise=0.05, random_state=0)
    params = {"hidden_layer_sizes": (16,), "n_couplings": 4, "max_iter": 6, "batch_size": 256,
              "random_state": 0, "device": "cpu", "warm_start": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(**params).fit(X)
        est.score_samples(X)  # switches module_'s tables on
        est.fit(X)  # a warm refit trains a copy of module_
        monkeypatch.setattr(nets, "piecewise_linear", lambda net: None)
        ref = RealNVPDensity(**params).fit(X)
        ref.score_samples(X)
        ref.fit(X)
    assert est.validation_scores_ == ref.validation_scores_
    assert est.loss_curve_ == ref.loss_curve_


def test_hooks_keep_the_layers():
    net = use_tables(_random_mlp((8,), 2, "relu", 3))
    seen = []
    net[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        net(torch.zeros(10, 1, dtype=torch.float64))
    assert seen == [torch.Size([10, 2])]


def test_copies_and_pickles_leave_the_table_and_the_switch_behind():
    net = use_tables(_random_mlp((8,), 2, "relu", 4))
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)[:, None]
    with torch.no_grad():
        expected = net(x)
    assert "_piecewise_cache" in net.__dict__
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert "_piecewise_cache" not in other.__dict__
        assert "_use_tables" not in other.__dict__
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("inference_dtype", ["float64", "float32"])
def test_a_two_d_estimator_scores_and_samples_as_without_tables(
    activation, inference_dtype, monkeypatch
):
    X = datasets.make_moons(1500, noise=0.05, random_state=0)
    far = np.array([[40.0, -30.0], [-25.0, 60.0]])  # beyond the clipped ranges
    rows = np.vstack([datasets.make_moons(5000, noise=0.05, random_state=1), far])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(activation=activation, max_iter=5, random_state=0,
                             inference_dtype=inference_dtype, device="cpu").fit(X)
    with_tables = (est.score_samples(rows), est.sample(3000, random_state=1),
                   est.transform(rows), est.inverse_transform(est.transform(rows[:50])))
    assert all(
        m.__dict__.get("_piecewise_cache", (0, 0, None))[2] is not None
        for m in est._inference_module().modules() if isinstance(m, MLP)
    )
    monkeypatch.setattr(nets, "piecewise_linear", lambda net: None)
    est = pickle.loads(pickle.dumps(est))  # no cached tables or casts
    without = (est.score_samples(rows), est.sample(3000, random_state=1),
               est.transform(rows), est.inverse_transform(est.transform(rows[:50])))
    tol = {"rtol": 1e-10, "atol": 1e-9} if inference_dtype == "float64" else {
        "rtol": 1e-4, "atol": 1e-4}
    for a, b in zip(with_tables, without, strict=True):
        np.testing.assert_allclose(a, b, **tol)


def test_a_network_that_is_not_piecewise_linear_skips_the_table_check_entirely():
    # tanh conditioners run their layers; with tables switched on they must not pay for the
    # per-call parameter sums that key the cache of tabulable networks
    net = use_tables(MLP(1, 2, (8,), activation="tanh"))
    x = torch.linspace(-2, 2, 5)[:, None]
    with torch.no_grad():
        out = net(x)
    assert "_piecewise_cache" not in net.__dict__
    with torch.no_grad():
        torch.testing.assert_close(out, use_tables(net, enabled=False)(x))
