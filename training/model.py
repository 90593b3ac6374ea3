"""The VAE: a diagonal-Gaussian encoder Q(z|x), a Bernoulli or Gaussian decoder P(x|z), and the ELBO.

Shapes: x is (B, *example_shape) in model space (see `training.data.Normalization`), z is (B, d).

- Encoder Q_phi(z|x) = N(mu, diag(sigma^2)); it outputs mu and log sigma^2, so sigma^2 = exp(.) > 0.
- Decoder P_theta(x|z): Bernoulli with logits (mean = sigmoid(logits)), or Gaussian with mean and an
  identity covariance, or a learned per-dimension variance (a parameter, not a function of z).
- Loss per example = -ELBO = -log P(x|z) summed over dimensions + beta * KL(Q || N(0, I)), with
  KL = -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2) in closed form and z = mu + sigma * eps, where
  eps ~ N(0, I) is drawn by the caller, outside the graph (the reparameterisation trick).
- Free bits: each latent dimension's KL (averaged over the batch) is floored at `free_bits` nats in the
  training objective only; reported figures always use the true KL.

`EncoderGraph` and `DecoderGraph` are the deterministic modules that `training.export` writes to ONNX.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.config import TrainConfig, mlp_sizes

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class DecoderOutput:
    """What the decoder gives for a batch of z: (B, *example_shape) tensors."""

    mean: Tensor                 # Bernoulli: sigmoid(logits); Gaussian: the mean
    logits: Tensor | None = None  # Bernoulli only
    logvar: Tensor | None = None  # Gaussian only: log variance, broadcastable to mean


@dataclass
class ElboTerms:
    """Per-example terms of the ELBO for a batch."""

    log_lik: Tensor   # (B,) log P(x|z), summed over data dimensions (averaged over z samples)
    kl_per_dim: Tensor  # (B, d) closed-form KL per latent dimension
    iwae_bound: Tensor | None = None  # (B,) log (1/k) sum_i w_i, when k importance samples were drawn

    @property
    def kl(self) -> Tensor:
        return self.kl_per_dim.sum(dim=1)  # (B,)

    @property
    def neg_elbo(self) -> Tensor:
        return self.kl - self.log_lik  # (B,)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per dimension: (B, d) -> (B, d)."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def log_likelihood(x: Tensor, dec: DecoderOutput, likelihood: str) -> Tensor:
    """log P(x|z) summed over every data dimension: (B, *shape) -> (B,)."""
    if likelihood == "bernoulli":
        assert dec.logits is not None
        # x * l - softplus(l) == x log p + (1 - x) log(1 - p), stable for large |l|.
        ll = -F.binary_cross_entropy_with_logits(dec.logits, x, reduction="none")
    else:
        logvar = dec.logvar if dec.logvar is not None else torch.zeros_like(dec.mean)
        ll = -0.5 * ((x - dec.mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI)
    return ll.flatten(1).sum(dim=1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes[:-1]):  # hidden layers; the last Linear has no ReLU
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A VAE for examples of shape `example_shape`, built from a `TrainConfig`."""

    def __init__(self, config: TrainConfig, example_shape: tuple[int, ...]) -> None:
        super().__init__()
        if not config.hidden or config.latent_dim < 1:
            raise ValueError("hidden / latent_dim: left to be chosen from the input size; build the model "
                             "from config.resolved(n_in, n_train)")
        self.config = config
        self.example_shape = tuple(int(s) for s in example_shape)
        self.likelihood = config.likelihood
        n_in = math.prod(self.example_shape)
        if config.arch == "mlp":
            enc_sizes, dec_sizes = mlp_sizes(config, n_in)
            self.encoder_body: nn.Module = _mlp(enc_sizes)
            self.decoder_body: nn.Module = _mlp(dec_sizes)
        else:
            self.encoder_body, self.decoder_body = _conv_pair(config, self.example_shape)
        # Gaussian with learned variance: one log-variance per data dimension, independent of z.
        self.x_logvar = (nn.Parameter(torch.zeros(self.example_shape))
                         if config.likelihood == "gaussian" and config.learn_variance else None)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, *shape) -> mu (B, d), logvar (B, d)."""
        h = self.encoder_body(x.flatten(1) if self.config.arch == "mlp" else x)  # (B, 2d)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> DecoderOutput:
        """z (B, d) -> DecoderOutput with (B, *shape) tensors."""
        out = self.decoder_body(z).reshape(z.shape[0], *self.example_shape)
        if self.likelihood == "bernoulli":
            return DecoderOutput(mean=torch.sigmoid(out), logits=out)
        return DecoderOutput(mean=out, logvar=self.x_logvar)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[ElboTerms, Tensor, Tensor]:
        """One reparameterised pass. eps ~ N(0, I) comes from the caller: (B, d) for one sample per
        example, or (k, B, d) for k importance samples (then the terms carry the IWAE bound).

        Returns the ELBO terms and mu, logvar (both (B, d)).
        """
        mu, logvar = self.encode(x)
        if eps.dim() == 3:
            log_w, log_px_z = importance_log_weights(self, x, mu, logvar, eps)  # (k, B) each
            bound = torch.logsumexp(log_w, dim=0) - math.log(eps.shape[0])  # (B,)
            return ElboTerms(log_lik=log_px_z.mean(dim=0), kl_per_dim=kl_divergence(mu, logvar),
                             iwae_bound=bound), mu, logvar
        z = torch.addcmul(mu, torch.exp(0.5 * logvar), eps)  # (B, d)
        dec = self.decode(z)
        return ElboTerms(log_lik=log_likelihood(x, dec, self.likelihood),
                         kl_per_dim=kl_divergence(mu, logvar)), mu, logvar


def training_objective(terms: ElboTerms, beta: float, free_bits: float) -> Tensor:
    """Mean over the batch of -log P(x|z) + beta * KL, with the per-dimension free-bits floor; or, when
    the terms carry an importance-weighted bound (k samples), minus its batch mean."""
    if terms.iwae_bound is not None:
        return -terms.iwae_bound.mean()
    kl_dims = terms.kl_per_dim.mean(dim=0)  # (d,) batch-averaged KL per latent dimension
    if free_bits > 0:
        kl_dims = torch.clamp(kl_dims, min=free_bits)
    return -terms.log_lik.mean() + beta * kl_dims.sum()


def importance_log_weights(model: VAE, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x) for z_i = mu + sigma * eps_i.

    x (B, *shape); mu, logvar (B, d); eps (n, B, d). Returns log w (n, B) and log p(x|z_i) (n, B).
    """
    n, b, d = eps.shape
    z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * eps  # (n, B, d)
    dec = model.decode(z.reshape(n * b, d))
    xr = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
    log_px_z = log_likelihood(xr, dec, model.likelihood).reshape(n, b)
    # log p(z) - log q(z|x); the 2*pi terms cancel.
    log_pz_qz = (-0.5 * (z.pow(2) - eps.pow(2) - logvar.unsqueeze(0))).sum(dim=2)  # (n, B)
    return log_px_z + log_pz_qz, log_px_z


@torch.no_grad()
def iwae_log_likelihood(model: VAE, x: Tensor, k: int, generator: torch.Generator | None = None,
                        chunk: int = 256) -> Tensor:
    """Importance-weighted estimate of log P(x) with k samples (the IWAE bound): (B, *shape) -> (B,).

    log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x). Samples are drawn in chunks
    so memory stays bounded for large k.
    """
    mu, logvar = model.encode(x)  # (B, d)
    b, d = mu.shape
    log_ws: list[Tensor] = []
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn((n, b, d), generator=generator, device=mu.device, dtype=mu.dtype)
        log_ws.append(importance_log_weights(model, x, mu, logvar, eps)[0])
        done += n
    log_w = torch.cat(log_ws, dim=0)  # (k, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


class EncoderGraph(nn.Module):
    """The exported encoder: x (N, *shape) -> mu (N, d), var (N, d), logvar (N, d). No randomness."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.vae.encode(x)
        return mu, torch.exp(logvar), logvar


class DecoderGraph(nn.Module):
    """The exported decoder: z (N, d) -> x_mean (N, *shape), plus `logits` (Bernoulli) or `x_var`
    (Gaussian with learned variance, (N, *shape)). No randomness. The outputs' names are the manifest's
    (serving.manifest.graph_specs); training.export checks this graph gives what they describe."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> tuple[Tensor, ...]:
        dec = self.vae.decode(z)
        if dec.logits is not None:
            return dec.mean, dec.logits
        if dec.logvar is not None:
            return dec.mean, torch.exp(dec.logvar).expand_as(dec.mean)
        return (dec.mean,)


def _conv_pair(config: TrainConfig, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """Conv encoder/decoder for (C, H, W) images: each layer halves (encoder) or doubles (decoder) H, W."""
    if len(shape) != 3:
        raise ValueError(f"arch 'conv': expected examples of shape (C, H, W), got {shape}")
    c, h, w = shape
    n = len(config.conv_channels)
    if h % (2 ** n) or w % (2 ** n):
        raise ValueError(f"arch 'conv': H and W must be divisible by 2**{n} (one halving per conv "
                         f"layer), got H={h}, W={w}")
    hh, ww = h // 2 ** n, w // 2 ** n
    chans = [c, *config.conv_channels]
    enc: list[nn.Module] = []
    for a, b in itertools.pairwise(chans):
        enc += [nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1), nn.ReLU()]
    flat = chans[-1] * hh * ww
    enc += [nn.Flatten(1), nn.Linear(flat, config.hidden[0]), nn.ReLU(),
            nn.Linear(config.hidden[0], 2 * config.latent_dim)]
    dec: list[nn.Module] = [nn.Linear(config.latent_dim, config.hidden[0]), nn.ReLU(),
                            nn.Linear(config.hidden[0], flat), nn.ReLU(),
                            nn.Unflatten(1, (chans[-1], hh, ww))]
    rev = list(reversed(chans))
    for i, (a, b) in enumerate(itertools.pairwise(rev)):
        dec.append(nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1))
        if i < len(rev) - 2:
            dec.append(nn.ReLU())
    return nn.Sequential(*enc), nn.Sequential(*dec)
