"""Held-out metrics from sums over examples: -ELBO, its terms, per-dimension KL and active units.

`heldout_sums` runs the model over a split and returns float64 sums that can be all-reduced across ranks;
`stats_from_sums` turns (reduced) sums into metrics. `training.epoch.validate` (the validation metrics of
every epoch) and `training.evaluate` (the test split) both use them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from training.model import VAE

ACTIVE_UNIT_THRESHOLD = 0.01  # a latent dimension is active when Var_x[E_q(z|x) z] exceeds this
EVAL_BATCH = 1024


@torch.no_grad()
def heldout_sums(model: VAE, x: Tensor, eps: Tensor, batch_size: int = EVAL_BATCH) -> dict[str, Tensor]:
    """Sums over examples (float64) from which held-out metrics follow; all-reducible across ranks.

    x (N, *shape), eps (N, d) ~ N(0, I): one reparameterised sample per example, drawn by the caller.
    """
    d = eps.shape[1]
    dev = x.device
    sums = {"n": torch.zeros((), dtype=torch.float64, device=dev),
            "log_lik": torch.zeros((), dtype=torch.float64, device=dev),
            "kl_per_dim": torch.zeros(d, dtype=torch.float64, device=dev),
            "mu": torch.zeros(d, dtype=torch.float64, device=dev),
            "mu_sq": torch.zeros(d, dtype=torch.float64, device=dev)}
    for start in range(0, len(x), batch_size):
        terms, mu, _ = model(x[start:start + batch_size], eps[start:start + batch_size])
        mu = mu.double()
        sums["n"] += len(mu)
        sums["log_lik"] += terms.log_lik.double().sum()
        sums["kl_per_dim"] += terms.kl_per_dim.double().sum(dim=0)
        sums["mu"] += mu.sum(dim=0)
        sums["mu_sq"] += mu.pow(2).sum(dim=0)
    return sums


def stats_from_sums(sums: dict[str, Tensor]) -> dict[str, Any]:
    """-ELBO, its two terms, per-dimension KL and active units from `heldout_sums` (reduced) output."""
    n = float(sums["n"])
    kl_per_dim = (sums["kl_per_dim"] / n).cpu()
    mean_mu = sums["mu"] / n
    var_mu = (sums["mu_sq"] / n - mean_mu.pow(2)).clamp(min=0).cpu()  # (d,) variance over data of E_q[z]
    recon_log_lik = float(sums["log_lik"]) / n
    kl = float(kl_per_dim.sum())
    return {"neg_elbo": kl - recon_log_lik, "recon_log_lik": recon_log_lik, "kl": kl,
            "kl_per_dim": [float(v) for v in kl_per_dim],
            "active_units": int((var_mu > ACTIVE_UNIT_THRESHOLD).sum()),
            "posterior_mean_var": [float(v) for v in var_mu]}
