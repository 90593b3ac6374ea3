"""The VAE objective: closed-form KL, reparameterised gradients, a loss computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import ConfigError, TrainConfig
from training.model import VAE, DecoderOutput, ElboTerms, kl_divergence, log_likelihood, training_objective


def test_closed_form_kl_equals_a_monte_carlo_estimate() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.3, -0.7, 1.2]], dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((400_000, 3), generator=g, dtype=torch.float64)  # (S, 3) ~ Q
    log_q = -0.5 * (((z - mu) / std) ** 2 + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z ** 2 + math.log(2 * math.pi))
    mc = (log_q - log_p).mean(dim=0)  # (3,) E_Q[log Q - log P] per dimension
    closed = kl_divergence(mu, logvar)[0]
    torch.testing.assert_close(mc, closed, atol=0.02, rtol=0.01)


def test_kl_is_zero_for_the_prior_itself() -> None:
    assert torch.equal(kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)), torch.zeros(2, 4))


def test_gradients_flow_through_mu_and_sigma_via_the_reparameterisation() -> None:
    model = VAE(TrainConfig(latent_dim=2, hidden=(8,)), (6,))
    x = torch.rand(5, 6)
    eps = torch.randn(5, 2)
    mu, logvar = model.encode(x)
    mu.retain_grad()
    logvar.retain_grad()
    z = mu + torch.exp(0.5 * logvar) * eps
    loss = -log_likelihood(x, model.decode(z), "bernoulli").sum()
    loss.backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_the_loss_of_a_tiny_case_matches_a_hand_computation() -> None:
    # One example, two pixels, one latent dimension, Bernoulli decoder with given logits.
    x = torch.tensor([[1.0, 0.0]])
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.5, 0.75)
    mu, logvar = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    terms = ElboTerms(log_lik=log_likelihood(x, DecoderOutput(mean=torch.sigmoid(logits), logits=logits),
                                             "bernoulli"),
                      kl_per_dim=kl_divergence(mu, logvar))
    # log P(x|z) = log 0.5 + log(1 - 0.75); KL = -1/2 (1 + 0 - 1 - 1) = 0.5
    expected_log_lik = math.log(0.5) + math.log(0.25)
    assert terms.log_lik.item() == pytest.approx(expected_log_lik, abs=1e-6)
    assert terms.kl.item() == pytest.approx(0.5)
    assert terms.neg_elbo.item() == pytest.approx(0.5 - expected_log_lik, abs=1e-6)
    assert training_objective(terms, beta=2.0, free_bits=0.0).item() == pytest.approx(1.0 - expected_log_lik,
                                                                                       abs=1e-6)
    # free bits: a KL below the floor counts as the floor in the objective only
    assert training_objective(terms, beta=1.0, free_bits=0.8).item() == pytest.approx(0.8 - expected_log_lik,
                                                                                      abs=1e-6)


def test_gaussian_log_likelihood_matches_torch_normal() -> None:
    x, mean = torch.randn(3, 4), torch.randn(3, 4)
    ll = log_likelihood(x, DecoderOutput(mean=mean), "gaussian")
    ref = torch.distributions.Normal(mean, 1.0).log_prob(x).sum(dim=1)
    torch.testing.assert_close(ll, ref)


def test_the_iwae_objective_with_one_sample_is_the_single_sample_importance_weight() -> None:
    torch.manual_seed(0)
    model = VAE(TrainConfig(latent_dim=3, hidden=(8,)), (6,)).double()
    x = torch.rand(4, 6, dtype=torch.float64)
    eps = torch.randn(1, 4, 3, dtype=torch.float64)  # (k=1, B, d)
    terms, mu, logvar = model(x, eps)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps[0]
    q, prior = torch.distributions.Normal(mu, std), torch.distributions.Normal(0.0, 1.0)
    log_px_z = log_likelihood(x, model.decode(z), "bernoulli")
    by_hand = log_px_z + prior.log_prob(z).sum(1) - q.log_prob(z).sum(1)  # (B,) log w
    assert terms.iwae_bound is not None
    torch.testing.assert_close(terms.iwae_bound, by_hand)
    torch.testing.assert_close(terms.log_lik, log_px_z)
    loss = training_objective(terms, beta=1.0, free_bits=0.0)
    torch.testing.assert_close(loss, -by_hand.mean())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_more_importance_samples_tighten_the_bound_on_average() -> None:
    torch.manual_seed(0)
    model = VAE(TrainConfig(latent_dim=2, hidden=(16,)), (10,))
    x = torch.rand(256, 10)
    with torch.no_grad():
        one = model(x, torch.randn(1, 256, 2))[0].iwae_bound
        many = model(x, torch.randn(50, 256, 2))[0].iwae_bound
    assert one is not None and many is not None
    assert float(many.mean()) > float(one.mean())


def test_the_architecture_left_open_scales_with_the_input() -> None:
    digits, mnist = TrainConfig().resolved(64, 1293), TrainConfig().resolved(784, 7200)
    assert (digits.hidden, digits.latent_dim, digits.lr_schedule) == ((256,), 8, "constant")
    assert (mnist.hidden, mnist.latent_dim, mnist.lr_schedule) == ((400,), 32, "cosine")
    assert (digits.epochs, TrainConfig(time_budget_s=60).resolved(64, 1293).epochs) == (150, 0)
    given = TrainConfig(hidden=(128, 64), latent_dim=20, lr_schedule="cosine").resolved(784, 100)
    assert (given.hidden, given.latent_dim, given.lr_schedule) == ((128, 64), 20, "cosine")
    with pytest.raises(ValueError, match="hidden / latent_dim: left to be chosen"):
        VAE(TrainConfig(), (64,))


def test_the_iwae_objective_refuses_the_elbo_only_knobs() -> None:
    with pytest.raises(ConfigError, match=r"free_bits: the iwae objective .* expected 0.0, got 0.5"):
        TrainConfig(objective="iwae", free_bits=0.5)
    with pytest.raises(ConfigError, match=r"objective: expected one of \('elbo', 'iwae'\), got 'vi'"):
        TrainConfig(objective="vi")  # type: ignore[arg-type]
