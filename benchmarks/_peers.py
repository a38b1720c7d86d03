"""Peer Real-NVP flows (nflows, normflows, zuko) behind one estimator-like interface.

Each peer is built at the matched architecture of issue 8 (affine couplings whose conditioner is
one MLP with ReLU hidden layers giving shift and log-scale together, alternating halves) the way
that library's own documentation builds it, and trained with the loop a user writes: the data
standardised with the training mean and standard deviation, a shuffling ``DataLoader`` of
minibatches, Adam at a constant learning rate, a fixed number of epochs, and a step skipped when
its loss is not finite (as normflows' examples do). The standardisation's log-determinant is added
back in :meth:`PeerFlow.score_samples`, so every number is in the units of the raw data.

Peers use torch's global random state (their APIs offer no generator); every call that draws
random numbers runs inside ``torch.random.fork_rng`` with a fixed seed, so the caller's global
state is left as it was and runs are repeatable.
"""

from __future__ import annotations

import importlib
import math
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from torch import nn

__all__ = ["PEERS", "PeerFlow", "missing_peer_message", "peer_versions"]

PEERS = ("nflows", "normflows", "zuko")


def peer_versions() -> dict[str, str | None]:
    """Installed version of each peer library (None if absent)."""
    out = {}
    for name in PEERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def missing_peer_message(name: str) -> str | None:
    """None when ``name`` imports, else a one-line reason to print."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip this peer"
        return f"skipping {name}: cannot import it ({type(exc).__name__}: {exc})"
    return None


# --------------------------------------------------------------------------- builders
# Each returns (module with parameters, log_prob(x), sample(n)); x and samples standardised.


def _build_nflows(n_features: int, n_couplings: int, hidden: tuple[int, ...]):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import MLP
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import AffineCouplingTransform

    class Conditioner(MLP):
        # nflows calls transform_net(x, context); its MLP takes no context argument.
        def forward(self, inputs, context=None):
            return super().forward(inputs)

    def conditioner(n_in: int, n_out: int) -> nn.Module:
        return Conditioner((n_in,), (n_out,), hidden_sizes=list(hidden))

    # nflows' SimpleRealNVP mask: +1 = transformed, alternating even/odd features per layer.
    mask = torch.ones(n_features)
    mask[::2] = -1
    layers = []
    for _ in range(n_couplings):
        layers.append(AffineCouplingTransform(mask.clone(), conditioner))
        mask = -mask
    flow = Flow(CompositeTransform(layers), StandardNormal([n_features]))
    return flow, flow.log_prob, flow.sample


def _build_normflows(n_features: int, n_couplings: int, hidden: tuple[int, ...]):
    import normflows as nf

    # normflows' README Real NVP: AffineCouplingBlock on a channel split, then a swap permutation.
    half = n_features // 2
    flows = []
    for _ in range(n_couplings):
        param_map = nf.nets.MLP([half, *hidden, 2 * (n_features - half)], init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(param_map))
        flows.append(nf.flows.Permute(n_features, mode="swap"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(n_features), flows)
    return model, model.log_prob, lambda n: model.sample(n)[0]


def _build_zuko(n_features: int, n_couplings: int, hidden: tuple[int, ...]):
    import zuko

    flow = zuko.flows.RealNVP(
        n_features, transforms=n_couplings, hidden_features=hidden, activation=nn.ReLU
    )
    return flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,))


_BUILDERS = {"nflows": _build_nflows, "normflows": _build_normflows, "zuko": _build_zuko}


# --------------------------------------------------------------------------- estimator face


class PeerFlow:
    """A peer library's Real-NVP, trained with a standard user loop.

    Parameters
    ----------
    library : {"nflows", "normflows", "zuko"}
    n_couplings, hidden_layer_sizes : matched architecture
    max_iter : int
        Epochs.
    batch_size : int
    learning_rate_init : float
        Adam's (constant) learning rate.
    random_state : int
        Seeds weights, minibatch order and sampling (through ``fork_rng``).
    loader : {"dataloader", "tensor"}
        ``"dataloader"`` (the usual user loop: ``DataLoader(TensorDataset(x), shuffle=True)``) or
        ``"tensor"`` (a permutation indexing one tensor, no DataLoader).
    """

    def __init__(
        self,
        library,
        *,
        n_couplings=8,
        hidden_layer_sizes=(64, 64),
        max_iter=40,
        batch_size=512,
        learning_rate_init=1e-3,
        random_state=0,
        loader="dataloader",
    ):
        self.library = library
        self.n_couplings = n_couplings
        self.hidden_layer_sizes = tuple(hidden_layer_sizes)
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.random_state = random_state
        self.loader = loader

    def _batches(self, x: torch.Tensor, generator: torch.Generator):
        if self.loader == "dataloader":
            data = torch.utils.data.TensorDataset(x)
            loader = torch.utils.data.DataLoader(
                data, batch_size=self.batch_size, shuffle=True, generator=generator
            )
            return (xb for (xb,) in loader)
        perm = torch.randperm(len(x), generator=generator)
        return (x[perm[i : i + self.batch_size]] for i in range(0, len(x), self.batch_size))

    def fit(self, X: np.ndarray) -> PeerFlow:
        self.loc_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ <= 0] = 1.0
        x = torch.as_tensor((X - self.loc_) / self.scale_, dtype=torch.float32)
        generator = torch.Generator().manual_seed(self.random_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self.module_, self._log_prob, self._sample = _BUILDERS[self.library](
                X.shape[1], self.n_couplings, self.hidden_layer_sizes
            )
            optimizer = torch.optim.Adam(self.module_.parameters(), lr=self.learning_rate_init)
            self.module_.train()
            self.loss_curve_, self.skipped_steps_ = [], 0
            for _ in range(self.max_iter):
                total, rows = 0.0, 0
                for xb in self._batches(x, generator):
                    loss = -self._log_prob(xb).mean()
                    if not torch.isfinite(loss):
                        self.skipped_steps_ += 1
                        continue
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(xb)
                    rows += len(xb)
                self.loss_curve_.append(total / rows if rows else math.nan)
        self.module_.eval()
        return self

    def score_samples(self, X: np.ndarray, batch_rows: int = 65536) -> np.ndarray:
        x = torch.as_tensor((X - self.loc_) / self.scale_, dtype=torch.float32)
        out = np.empty(len(X))
        with torch.no_grad():
            for i in range(0, len(X), batch_rows):
                out[i : i + batch_rows] = self._log_prob(x[i : i + batch_rows]).double().numpy()
        return out - np.log(self.scale_).sum()

    def sample(self, n_samples: int, random_state: int = 0) -> np.ndarray:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(random_state)
            z = self._sample(n_samples).double().numpy()
        return z * self.scale_ + self.loc_
