"""One epoch of training steps, and the validation after it: the hot loop of `python -m training.fit`.

The dataset lives in memory as tensors on the training device; each step slices a batch out of the
epoch's permutation, so the loop does no per-example Python work. The reparameterisation noise and
dynamic binarisation come from `noise_generator(seed, epoch, rank)`; the learning rate and KL weight of
each step from training/schedule.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from training import distributed as D
from training.config import TrainConfig
from training.heldout import heldout_sums, stats_from_sums
from training.mlp_step import MlpElboStep
from training.model import VAE, training_objective
from training.schedule import Clock, kl_weight, lr_factor


def noise_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for epoch `epoch` on `rank`: eps ~ N(0, I) and binarisation draws."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch * 7_919 + rank) % 2**63)


# eps for this many steps is drawn at once (a draw per step cost about 1% of a 784-400-20 step on a CPU core;
# a whole epoch's at once would hold k x N x d floats for IWAE)
NOISE_STEPS = 32


def make_optimizer(vae: VAE, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one op per step for all parameters) on CPU and CUDA."""
    return torch.optim.Adam(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=device.type in ("cpu", "cuda"))


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside, the previous setting restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def train_one_epoch(model: nn.Module, vae: VAE, opt: torch.optim.Optimizer, x_train: Tensor, shard: Tensor,
                    per_rank_batch: int, config: TrainConfig, epoch: int, gen: torch.Generator,
                    clock: Clock | None = None, progress: tqdm | None = None) -> tuple[dict[str, Tensor], int]:
    """One pass over this rank's shard, or part of it if `clock` runs out. `model` is the VAE or its DDP
    wrapper; returns float64 sums (all-reducible) and the number of steps taken. The steps' matrix products
    run at `config.matmul_precision`; whatever was set before holds again on return.

    x_train (N, *shape) on the device; shard (n,) int64 indices into it (this rank, this epoch).
    """
    assert config.matmul_precision != "auto", "train_one_epoch needs a resolved config"
    with float32_matmul_precision(config.matmul_precision):
        return _train_steps(model, vae, opt, x_train, shard, per_rank_batch, config, epoch, gen, clock, progress)


def _train_steps(model: nn.Module, vae: VAE, opt: torch.optim.Optimizer, x_train: Tensor, shard: Tensor,
                 per_rank_batch: int, config: TrainConfig, epoch: int, gen: torch.Generator,
                 clock: Clock | None, progress: tqdm | None) -> tuple[dict[str, Tensor], int]:
    model.train()
    dev = x_train.device
    steps = -(-len(shard) // per_rank_batch)
    shard = shard.to(dev)
    d = vae.config.latent_dim
    k = config.iwae_k if config.objective == "iwae" else 0
    # per step (sum log P(x|z), sum KL) over its batch, summed in float64 at the end
    step_sums = torch.zeros((steps, 2), dtype=torch.float32, device=dev)
    clock = clock or Clock(0.0, D.DistContext())
    manual = MlpElboStep(vae, opt, config.free_bits, config.grad_clip) if config.backward == "manual" else None
    done = taken = 0
    for step in range(steps):
        elapsed = clock.elapsed_s() if clock.budget_s else 0.0
        if clock.out_of_time(elapsed):
            break
        lr = config.lr * lr_factor(config, epoch * steps + step, steps, clock.fraction(elapsed))
        for group in opt.param_groups:
            group["lr"] = lr
        # (b, *shape): gathered per step. One gather of the whole epoch, sliced, was 4% slower a step on
        # 784-400-20 (the batch then comes from memory, not from the cache the gather just wrote)
        x = torch.index_select(x_train, 0, shard[step * per_rank_batch:(step + 1) * per_rank_batch])
        if config.binarize:
            x = torch.bernoulli(x, generator=gen)  # dynamic binarisation
        if step % NOISE_STEPS == 0:  # one draw of eps for the next NOISE_STEPS steps
            rows = min(NOISE_STEPS * per_rank_batch, len(shard) - step * per_rank_batch)
            noise = torch.randn((k, rows, d) if k else (rows, d), generator=gen, device=dev)
        at = step % NOISE_STEPS * per_rank_batch
        eps = noise[..., at:at + len(x), :]  # (b, d) or (k, b, d)
        if manual is not None:
            manual.step(x, eps, kl_weight(config, epoch, step, steps), out=step_sums[step])
        else:
            terms, _, _ = model(x, eps)
            loss = training_objective(terms, kl_weight(config, epoch, step, steps), config.free_bits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            opt.step()
            torch.stack([terms.log_lik.detach().sum(), terms.kl.detach().sum()], out=step_sums[step])
        done += len(x)
        taken += 1
        if progress is not None and not progress.disable:
            progress.update(1)
            if step % 10 == 0 or step == steps - 1:
                so_far = step_sums[:taken].sum(0, dtype=torch.float64)
                progress.set_postfix(neg_elbo=f"{float(so_far[1] - so_far[0]) / done:.2f}", refresh=False)
    sums = step_sums[:taken].sum(0, dtype=torch.float64)
    n = torch.tensor(float(done), dtype=torch.float64, device=dev)
    return {"n": n, "log_lik": sums[0], "kl": sums[1]}, taken


def validate(vae: VAE, x_val: Tensor, config: TrainConfig, ctx: D.DistContext) -> dict[str, Any]:
    """Validation metrics, each rank on a contiguous slice, reduced. The noise does not depend on ranks."""
    vae.eval()
    g = torch.Generator(device=x_val.device).manual_seed(config.seed + 1_000_000)
    eps = torch.randn((len(x_val), config.latent_dim), generator=g, device=x_val.device)  # same every epoch
    part = D.contiguous_shard(len(x_val), ctx)
    sums = heldout_sums(vae, x_val[part], eps[part])
    return stats_from_sums({k: D.all_reduce_sum(v, ctx) for k, v in sums.items()})
