"""The hand-written MLP step (training/mlp_step.py) against autograd on the same batch."""

from __future__ import annotations

import pytest
import torch

from training.config import ConfigError, TrainConfig
from training.mlp_step import MlpElboStep
from training.model import VAE, training_objective


def _autograd_reference(vae: VAE, x: torch.Tensor, eps: torch.Tensor, beta: float,
                        free_bits: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    terms, _, _ = vae(x, eps)
    training_objective(terms, beta, free_bits).backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    for p in vae.parameters():
        p.grad = None
    return grads, torch.stack([terms.log_lik.sum(), terms.kl.sum()]).detach()


@pytest.mark.parametrize(("hidden", "beta", "free_bits"), [
    ((40,), 1.0, 0.0),
    ((48, 24), 0.5, 0.0),           # two hidden layers: the ReLU chain in between
    ((40,), 2.0, "between"),        # free bits holding about half of the latent dimensions at the floor
])
def test_the_manual_gradients_and_sums_equal_autograds(hidden: tuple[int, ...], beta: float,
                                                       free_bits: float | str) -> None:
    torch.manual_seed(0)
    vae = VAE(TrainConfig(hidden=hidden, latent_dim=6), (8, 8)).double()
    last = list(vae.encoder_body.children())[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.mul_(4.0)  # spread the per-dimension KL so a floor splits the dimensions
    x = torch.rand(17, 8, 8, dtype=torch.float64)
    eps = torch.randn(17, 6, dtype=torch.float64)
    if free_bits == "between":
        kl_dims = vae(x, eps)[0].kl_per_dim.mean(dim=0).detach().sort().values  # (d,)
        free_bits = float(kl_dims[2:4].mean())  # between two dimensions, never at one
        assert 0 < int((kl_dims > free_bits).sum()) < 6
    assert isinstance(free_bits, float)
    expected, expected_sums = _autograd_reference(vae, x, eps, beta, free_bits)
    step = MlpElboStep(vae, torch.optim.Adam(vae.parameters()), free_bits, grad_clip=0.0)
    sums = step.gradients(x, eps, beta)
    torch.testing.assert_close(sums, expected_sums)
    for name, p in vae.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_a_manual_step_moves_the_parameters_as_an_autograd_step_does() -> None:
    torch.manual_seed(1)
    config = TrainConfig(hidden=(32,), latent_dim=4, grad_clip=0.5)
    a, b = VAE(config, (20,)), VAE(config, (20,))
    b.load_state_dict(a.state_dict())
    x, eps = torch.rand(9, 20), torch.randn(9, 4)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, fused=True)
    manual = MlpElboStep(a, opt_a, free_bits=0.0, grad_clip=0.5)
    for _ in range(3):
        manual.step(x, eps, 1.0)
        terms, _, _ = b(x, eps)
        opt_b.zero_grad()
        training_objective(terms, 1.0, 0.0).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name, rtol=1e-5, atol=1e-6)


def test_backward_auto_picks_the_manual_step_only_where_it_is_written_for() -> None:
    assert TrainConfig().resolved(64, 1000).backward == "manual"
    assert TrainConfig().resolved(64, 1000, world_size=2).backward == "autograd"
    assert TrainConfig(likelihood="gaussian").resolved(64, 1000).backward == "autograd"
    assert TrainConfig(objective="iwae").resolved(64, 1000).backward == "autograd"
    assert TrainConfig(arch="conv").resolved(784, 1000).backward == "autograd"
    assert TrainConfig(backward="autograd").resolved(64, 1000).backward == "autograd"
    with pytest.raises(ConfigError, match=r"backward: 'manual' is written for arch 'mlp'.* got arch 'conv'"):
        TrainConfig(arch="conv", backward="manual").resolved(784, 1000)
    with pytest.raises(ValueError, match=r"backward 'manual': not available for likelihood 'gaussian'"):
        MlpElboStep(VAE(TrainConfig(hidden=(8,), latent_dim=2, likelihood="gaussian"), (4,)),
                    torch.optim.Adam([torch.zeros(1, requires_grad=True)]), 0.0, 0.0)


def test_logits_past_the_sigmoids_float32_range_still_give_the_true_log_likelihood() -> None:
    torch.manual_seed(2)
    vae = VAE(TrainConfig(hidden=(16,), latent_dim=3), (10,))
    last = list(vae.decoder_body.children())[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias[:5] = 120.0  # sigmoid(-120) is 0 in float32: log would give -inf
    x = torch.rand(4, 10)
    eps = torch.randn(4, 3)
    _, expected_sums = _autograd_reference(vae, x, eps, 1.0, 0.0)
    sums = MlpElboStep(vae, torch.optim.Adam(vae.parameters()), 0.0, 0.0).gradients(x, eps, 1.0)
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums, expected_sums)


class _Recording(torch.nn.Module):
    """The VAE, recording the batches and noise each autograd step gives it."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.precisions: list[str] = []

    def forward(self, x: torch.Tensor, eps: torch.Tensor):  # type: ignore[no-untyped-def]
        self.seen.append((x.clone(), eps.clone()))
        self.precisions.append(torch.get_float32_matmul_precision())
        return self.vae(x, eps)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_an_epoch_gives_every_step_its_own_batch_and_fresh_noise_and_sums_every_step(objective: str) -> None:
    """More steps than one draw of noise covers (epoch.NOISE_STEPS) and a short last batch: each step gets
    the rows its slice of the shard names, noise of its own shape never reused, and the epoch's sums are its steps'."""
    from training import epoch

    n, b = (epoch.NOISE_STEPS + 3) * 4 + 2, 4  # 35 full batches and one of 2
    config = TrainConfig(hidden=(8,), latent_dim=3, batch_size=b, objective=objective, iwae_k=2,  # type: ignore[arg-type]
                         backward="autograd", matmul_precision="medium").resolved(5, n)
    torch.manual_seed(0)
    vae = VAE(config, (5,))
    model = _Recording(vae)
    opt = epoch.make_optimizer(vae, config, torch.device("cpu"))
    x_train = torch.rand(n, 5)
    shard = torch.randperm(n)
    before = torch.get_float32_matmul_precision()
    sums, taken = epoch.train_one_epoch(model, vae, opt, x_train, shard, b, config, 0,
                                        epoch.noise_generator(0, 0, 0, torch.device("cpu")))
    assert set(model.precisions) == {"medium"}  # the steps ran at the config's precision ...
    assert torch.get_float32_matmul_precision() == before  # ... and validation after them does not
    steps = -(-n // b)
    assert taken == len(model.seen) == steps
    for i, (x, eps) in enumerate(model.seen):
        torch.testing.assert_close(x, x_train[shard[i * b:(i + 1) * b]], rtol=0, atol=0)
        rows = len(x)
        assert eps.shape == ((2, rows, 3) if objective == "iwae" else (rows, 3))
    noise = torch.cat([eps.reshape(-1) for _, eps in model.seen])
    assert len(torch.unique(noise)) == len(noise)  # no value drawn twice: no step reuses another's noise
    assert abs(float(noise.mean())) < 0.15 and abs(float(noise.std()) - 1.0) < 0.1
    assert float(sums["n"]) == n
    assert torch.isfinite(sums["log_lik"]) and float(sums["kl"]) > 0


def test_the_manual_step_writes_its_sums_where_asked_and_keeps_working_across_batch_sizes() -> None:
    torch.manual_seed(3)
    config = TrainConfig(hidden=(16,), latent_dim=3)
    vae = VAE(config, (10,))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
    step = MlpElboStep(vae, opt, 0.0, 0.0)
    out = torch.zeros(3, 2)
    for i, rows in enumerate((7, 7, 3)):  # the first step creates Adam's state, the last is a short batch
        x, eps = torch.rand(rows, 10), torch.randn(rows, 3)
        reference = VAE(config, (10,))
        reference.load_state_dict(vae.state_dict())
        _, expected = _autograd_reference(reference, x, eps, 1.0, 0.0)
        returned = step.step(x, eps, 1.0, out=out[i])
        assert returned.data_ptr() == out[i].data_ptr()
        torch.testing.assert_close(out[i], expected)
    assert all(float(st["step"]) == 3 for st in opt.state.values())


def test_matmul_precision_auto_is_bfloat16_products_only_for_big_products_on_a_cpu_with_amx(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from training.config import BF16_MIN_PRODUCT_MACS, auto_matmul_precision, largest_product_macs

    assert auto_matmul_precision("cuda", 10**9) == "highest"
    assert TrainConfig(matmul_precision="high").resolved(64, 100).matmul_precision == "high"
    mnist, digits = TrainConfig().resolved(784, 8000), TrainConfig().resolved(64, 1437)
    assert largest_product_macs(mnist, 784, 128) == 128 * 784 * 400 >= BF16_MIN_PRODUCT_MACS
    assert largest_product_macs(digits, 64, 128) == 128 * 64 * 256 < BF16_MIN_PRODUCT_MACS
    assert largest_product_macs(TrainConfig(arch="conv").resolved(784, 100), 784, 128) == 0
    assert largest_product_macs(TrainConfig(likelihood="gaussian").resolved(784, 100), 784, 128) == 0
    for caps, expected in (({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, "medium"),
                           ({"amx_bf16": False, "amx_tile": False, "avx512_bf16": True}, "highest"),
                           ({}, "highest")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert auto_matmul_precision("cpu", BF16_MIN_PRODUCT_MACS) == expected
        assert TrainConfig().resolved(784, 8000).matmul_precision == expected
        assert TrainConfig().resolved(64, 1437).matmul_precision == "highest"  # digits: too small to pay
        assert TrainConfig().resolved(784, 8000, world_size=8).matmul_precision == "highest"  # 16 a rank
    with pytest.raises(ConfigError, match=r"matmul_precision: expected one of .*'medium'.*got 'bf16'"):
        TrainConfig(matmul_precision="bf16")  # type: ignore[arg-type]
