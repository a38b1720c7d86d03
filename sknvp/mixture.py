r"""A trainable Gaussian-mixture base for flows, with its exact map to a standard normal.

:class:`GaussianMixtureBase` is the density of a flow's latent variable :math:`u` when the
base is a mixture of :math:`K` full-covariance Gaussians,

.. math::
    p(u) = \sum_k \pi_k\, \mathcal N(u; \mu_k, \Sigma_k), \qquad
    \Sigma_k^{-1} = P_k P_k^\top,

parameterised by the logits of :math:`\pi`, the means and the upper-triangular Cholesky
factors :math:`P_k` of the precisions (log-diagonal and strict upper triangle), as
scikit-learn's ``GaussianMixture`` stores ``precisions_cholesky_``.

It is also an invertible layer. Its Rosenblatt transform maps :math:`u` to a standard normal
:math:`z` one coordinate at a time, :math:`z_d = \Phi^{-1}(F(u_d \mid u_{<d}))`, where the
conditional CDF of a Gaussian mixture is again a mixture:

.. math::
    F(u_d \mid u_{<d}) = \sum_k \pi_{kd}(u_{<d})\, \Phi(\varepsilon_{kd}), \qquad
    \varepsilon_k = P_k^\top (u - \mu_k), \qquad
    \log \pi_{kd} \propto \log \pi_k + \sum_{j<d} \log \mathcal N(\varepsilon_{kj}; 0, 1)
        + \log P_{k,jj}.

Its Jacobian is triangular with determinant :math:`p(u) / \mathcal N(z; 0, I)`. A flow whose
last layer is this map is still a flow to a standard normal (``forward``/``inverse`` of
:class:`~sknvp.flows.RealNVPFlow`), while its log-density is computed directly as
:math:`\log p(u)` plus the other layers' log-determinants. The inverse solves one monotone
equation per coordinate by a bracketed Newton method (exact to rounding wherever the density
is not negligible, and slower than the forward map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._reduce import logsumexp, sum_last
from .em import MixtureFit, component_log_probs, standardized_residuals

__all__ = ["GaussianMixtureBase", "standardized_residuals"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_HALF = math.log(0.5)
# Above this many components, draw() gathers each row's factor instead of looping over them.
_DRAW_LOOP_COMPONENTS = 64


def _ndtri_exp(log_p: Tensor) -> Tensor:
    r""":math:`\Phi^{-1}(e^{\ell})` for :math:`\ell \le \log \tfrac12`, also where
    :math:`e^{\ell}` underflows (an asymptotic start refined by Newton steps on
    :math:`\log\Phi`)."""
    tiny = log_p < -30.0
    z = torch.special.ndtri(torch.exp(torch.where(tiny, torch.full_like(log_p, -30.0), log_p)))
    if bool(tiny.any()):
        lt = torch.where(tiny, log_p, torch.full_like(log_p, -31.0))
        t = -2.0 * lt
        x = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))
        for _ in range(4):  # Newton on log Phi(x) = lt; d/dx log Phi = phi / Phi
            log_phi = -0.5 * x * x - _HALF_LOG_2PI
            x = x - (torch.special.log_ndtr(x) - lt) / torch.exp(
                log_phi - torch.special.log_ndtr(x)
            )
        z = torch.where(tiny, x, z)
    return z


def _normal_from_log_cdfs(log_cdf: Tensor, log_sf: Tensor) -> Tensor:
    """The standard normal quantile of a probability given by its log and its log complement,
    using whichever tail keeps the precision."""
    lower = log_cdf < _LOG_HALF
    return torch.where(
        lower, _ndtri_exp(torch.minimum(log_cdf, torch.full_like(log_cdf, _LOG_HALF))),
        -_ndtri_exp(torch.minimum(log_sf, torch.full_like(log_sf, _LOG_HALF))),
    )


def _standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z * z).sum(1) - z.shape[1] * _HALF_LOG_2PI


class GaussianMixtureBase(nn.Module):
    r"""Trainable full-covariance Gaussian mixture: a flow's base density and last layer.

    Parameters
    ----------
    weights : Tensor of shape (n_components,)
        Mixture weights (positive; normalised here).
    means : Tensor of shape (n_components, n_features)
        Component means.
    precisions_cholesky : Tensor of shape (n_components, n_features, n_features)
        Upper-triangular Cholesky factors :math:`P_k` of the precision matrices,
        :math:`\Sigma_k^{-1} = P_k P_k^\top`, with a positive diagonal (scikit-learn's
        ``GaussianMixture.precisions_cholesky_`` for ``covariance_type="full"``).
    """

    def __init__(self, weights: Tensor, means: Tensor, precisions_cholesky: Tensor) -> None:
        super().__init__()
        means = torch.as_tensor(means)
        K, D = means.shape
        weights = torch.as_tensor(weights, dtype=means.dtype)
        prec = torch.as_tensor(precisions_cholesky, dtype=means.dtype)
        if weights.shape != (K,) or prec.shape != (K, D, D):
            raise ValueError(
                f"Expected weights of shape ({K},) and precisions_cholesky of shape "
                f"({K}, {D}, {D}) for means of shape ({K}, {D}); got {tuple(weights.shape)} "
                f"and {tuple(prec.shape)}."
            )
        diag = torch.diagonal(prec, dim1=1, dim2=2)
        if not (bool(torch.all(weights > 0)) and bool(torch.all(diag > 0))):
            raise ValueError(
                "GaussianMixtureBase needs positive weights and precision factors with a "
                "positive diagonal."
            )
        self.logits = nn.Parameter(torch.log(weights / weights.sum()))
        self.means = nn.Parameter(means.clone())
        self.log_diag = nn.Parameter(torch.log(diag).clone())
        self.upper = nn.Parameter(torch.triu(prec, diagonal=1).clone())
        self.register_buffer("_strict_upper", torch.ones(D, D).triu(1), persistent=False)

    @classmethod
    def placeholder(cls, n_components: int, n_features: int) -> GaussianMixtureBase:
        """A mixture of this shape with standard normal components, to load a saved
        ``state_dict`` into."""
        return cls(
            torch.ones(n_components, dtype=torch.float64),
            torch.zeros(n_components, n_features, dtype=torch.float64),
            torch.eye(n_features, dtype=torch.float64).repeat(n_components, 1, 1),
        )

    @classmethod
    def from_fit(cls, fit: MixtureFit) -> GaussianMixtureBase:
        """The mixture of an EM fit (:mod:`sknvp.em`), in the fit's dtype and device."""
        return cls(fit.weights, fit.means, fit.precisions_cholesky)

    def as_fit(self) -> MixtureFit:
        """This mixture's current parameters as a :class:`~sknvp.em.MixtureFit` (detached;
        its ``log_likelihood``, ``bic`` and ``n_iter`` are unknown: NaN, NaN, 0)."""
        with torch.no_grad():
            return MixtureFit(
                torch.softmax(self.logits, 0).clone(), self.means.clone(),
                self.precisions_cholesky().clone(), math.nan, math.nan, 0, True,
            )

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    def precisions_cholesky(self) -> Tensor:
        """The factors :math:`P_k`, shape ``(n_components, n_features, n_features)``."""
        return self.upper * self._strict_upper + torch.diag_embed(torch.exp(self.log_diag))

    def covariance_cholesky(self) -> Tensor:
        r"""Lower-triangular :math:`L_k = P_k^{-\top}`, with :math:`\Sigma_k = L_k L_k^\top`."""
        prec = self.precisions_cholesky()
        eye = torch.eye(self.n_features, dtype=prec.dtype, device=prec.device)
        return torch.linalg.solve_triangular(
            prec.transpose(1, 2), eye.expand_as(prec), upper=False
        )

    def standardized(self, u: Tensor) -> Tensor:
        r""":math:`\varepsilon_k = P_k^\top (u - \mu_k)` for every component, shape ``(n, K, D)``."""
        return standardized_residuals(u, self.means, self.precisions_cholesky())

    def _coordinate_log_terms(self, eps: Tensor) -> Tensor:
        """:math:`\\log \\mathcal N(\\varepsilon_{kd}; 0, 1) + \\log P_{k,dd}`, shape (n, K, D)."""
        return self.log_diag - 0.5 * eps * eps - _HALF_LOG_2PI

    def component_log_probs(self, u: Tensor) -> Tensor:
        """:math:`\\log \\pi_k + \\log \\mathcal N(u; \\mu_k, \\Sigma_k)`, shape ``(n, K)``."""
        if torch.is_grad_enabled() or u.dim() != 2:
            eps = self.standardized(u)
            return torch.log_softmax(self.logits, 0) + sum_last(self._coordinate_log_terms(eps))
        # Without autograd: the same sum as -|eps_k|^2 / 2 plus a constant per component,
        # with the residuals squared in place (one (n, K, D) tensor instead of five;
        # scoring 64-D digits with four components spent a sixth of its time here).
        return component_log_probs(
            u, torch.log_softmax(self.logits, 0), self.means, self.precisions_cholesky(),
            self.log_diag.sum(1),
        )

    def log_prob(self, u: Tensor) -> Tensor:
        """Log-density of each row of ``u``, shape ``(n,)``."""
        return logsumexp(self.component_log_probs(u), 1)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Rosenblatt transform to a standard normal: ``(z, log|det dz/du|)``."""
        eps = self.standardized(u)
        terms = self._coordinate_log_terms(eps)
        # log pi_k + sum_{j<d} terms: the conditional weights of coordinate d, unnormalised.
        before = torch.cumsum(terms, dim=2) - terms + torch.log_softmax(self.logits, 0)[:, None]
        norm = torch.logsumexp(before, dim=1)
        log_cdf = torch.logsumexp(before + torch.special.log_ndtr(eps), dim=1) - norm
        log_sf = torch.logsumexp(before + torch.special.log_ndtr(-eps), dim=1) - norm
        z = _normal_from_log_cdfs(log_cdf, log_sf)
        log_p = torch.logsumexp(before[:, :, -1] + terms[:, :, -1], dim=1)
        return z, log_p - _standard_normal_log_prob(z)

    def inverse(self, z: Tensor, max_iter: int = 200) -> tuple[Tensor, Tensor]:
        """Inverse Rosenblatt transform: ``(u, log|det du/dz|)``.

        Coordinate by coordinate, the conditional mixture CDF is inverted by Newton's method
        kept inside a bracket (the components' own quantiles, which enclose the solution): a
        step that would leave the bracket, or that follows a Newton step which did not halve
        the residual (Newton can cycle between a mixture's modes), bisects it instead. Each
        coordinate stops when the steps reach the rounding of ``z``'s dtype (at most
        ``max_iter`` steps).
        """
        K, D = self.means.shape
        # u_d = mu_kd + sum_{j<=d} L_kdj eps_kj
        chol = self.covariance_cholesky()
        n = z.shape[0]
        eps = z.new_zeros(n, K, D)
        log_w = torch.log_softmax(self.logits, 0).expand(n, K)
        u = torch.empty_like(z)
        # Below the median the equation is log F(u) = log Phi(z), above it
        # log(1 - F(u)) = log Phi(-z): each form keeps the precision of its tail.
        lower = z < 0
        sign = torch.where(lower, 1.0, -1.0).to(z.dtype)
        target = torch.special.log_ndtr(sign * z)
        tol = 64 * torch.finfo(z.dtype).eps  # Newton's last steps jitter by a few ulps
        for d in range(D):
            center = self.means[:, d] + (eps[:, :, :d] * chol[:, d, :d]).sum(-1)  # (n, K)
            spread = chol[:, d, d]
            w = log_w - torch.logsumexp(log_w, 1, keepdim=True)
            u[:, d] = self._solve_coordinate(
                w, center, spread, z[:, d], sign[:, d:d + 1], target[:, d], max_iter, tol
            )
            eps[:, :, d] = (u[:, d:d + 1] - center) / spread
            log_w = log_w + self.log_diag[:, d] - 0.5 * eps[:, :, d] ** 2 - _HALF_LOG_2PI
        log_p = torch.logsumexp(log_w, dim=1)
        return u, _standard_normal_log_prob(z) - log_p

    @staticmethod
    def _solve_coordinate(w, center, spread, z, sign, target, max_iter, tol) -> Tensor:
        """The root in u of ``g(u) = sign * (log F_sign(u) - target)`` for each row, where
        ``F_+`` is the mixture CDF with log-weights ``w`` (n, K), means ``center`` (n, K) and
        spreads ``spread`` (K,), and ``F_-`` its complement; g increases with u. Rows drop
        out of the iteration as they converge."""
        quantiles = center + spread * z[:, None]
        lo, hi = quantiles.min(1).values, quantiles.max(1).values
        x = (torch.exp(w) * quantiles).sum(1).clamp(lo, hi)  # inside the bracket
        out = x.clone()
        rows = torch.arange(len(x), device=x.device)
        log_spread = torch.log(spread)
        sign = sign[:, 0]
        last = torch.full_like(x, math.inf)  # |g| before the last Newton step
        for _ in range(max_iter):
            e = (x[:, None] - center) / spread
            log_tail = torch.logsumexp(w + torch.special.log_ndtr(sign[:, None] * e), 1)
            g = sign * (log_tail - target)
            lo = torch.where(g < 0, x, lo)
            hi = torch.where(g > 0, x, hi)
            # g'(u) = p(u) / F_sign(u): the conditional density over the tail probability.
            log_pdf = torch.logsumexp(w - 0.5 * e * e - log_spread, 1) - _HALF_LOG_2PI
            new = x - g / torch.exp(log_pdf - log_tail)
            # Bisect where the step leaves the bracket (or is NaN), or where the last Newton
            # step did not halve |g| (Newton can cycle between the modes of a mixture).
            bisect = ~((new >= lo) & (new <= hi)) | (g.abs() > 0.5 * last)
            new = torch.where(bisect, 0.5 * (lo + hi), new)
            last = torch.where(bisect, math.inf, g.abs())
            scale = tol * torch.maximum(new.abs(), torch.ones_like(new))
            done = (g == 0) | ((new - x).abs() <= scale) | (hi - lo <= scale)
            out[rows] = torch.where(g == 0, x, new)
            keep = ~done
            if not bool(keep.any()):
                break
            rows, x, lo, hi, last = rows[keep], new[keep], lo[keep], hi[keep], last[keep]
            w, center, sign, target = w[keep], center[keep], sign[keep], target[keep]
        return out

    def draw(self, components: Tensor, noise: Tensor) -> Tensor:
        """Points ``mu_k + L_k noise`` for given component indices and standard normal noise
        (``noise`` scaled by a temperature gives proportionally narrower components)."""
        chol = self.covariance_cholesky()
        n, d = noise.shape
        rows = max(1, 2**20 // (d * d))
        if n <= rows or self.n_components > _DRAW_LOOP_COMPONENTS:
            # Batched products over the rows' own factors, in chunks of at most 2**20 values
            # (a loop over components would pass over all rows once per component).
            return torch.cat([
                self.means[components[a:a + rows]]
                + (chol[components[a:a + rows]] @ noise[a:a + rows].unsqueeze(2)).squeeze(2)
                for a in range(0, n, rows)
            ]) if n else noise.clone()
        out = torch.empty_like(noise)
        for k in range(self.n_components):
            rows = components == k
            if bool(rows.any()):
                out[rows] = noise[rows] @ chol[k].T + self.means[k]
        return out

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Draw ``n`` points; each component's spread is multiplied by ``temperature``."""
        probs = torch.softmax(self.logits.detach(), 0)
        components = torch.multinomial(probs, n, replacement=True, generator=generator)
        noise = torch.randn(
            (n, self.n_features), generator=generator, device=self.means.device,
            dtype=self.means.dtype,
        )
        return self.draw(components, noise * temperature)

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, n_features={self.n_features}"
