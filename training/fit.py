"""Train a VAE: one process, or data-parallel under torchrun.

    python -m training.fit --data digits --out runs/demo [--epochs 60] [--time-budget-s 60] [--resume]
    torchrun --nproc_per_node=2 -m training.fit --data digits --out runs/ddp     # gloo on CPU, NCCL on GPU

The defaults (chosen by measurement, benchmarks/train_recipes.py and BENCHMARKS.md) scale the network with
the input when `--hidden` / `--latent-dim` are not given, warm the learning rate up for one epoch and
then decay it along a cosine to 0 by the end of the run (`--epochs` or `--time-budget-s`, whichever ends
it first), and keep the checkpoint with the best validation -ELBO (best.pt) for evaluation and export.

The dataset lives in memory as tensors on the training device; each step slices a batch out of the
epoch's permutation, so the hot loop does no per-example Python work. All randomness is explicit:
the permutation of epoch e comes from `seed + e` (DistributedSampler semantics, see
training/distributed.py) and the reparameterisation noise and dynamic binarisation come from a
generator seeded from (seed, epoch, rank). A run killed at any point and restarted with `--resume`
therefore ends with exactly the metrics of an uninterrupted run (on CPU), unless `--time-budget-s` is set:
then where it stops, and the cosine schedule with it, follow the wall-clock.

`--batch-size` is the GLOBAL batch size: with N ranks each rank takes batch_size / N examples a step.

The run directory (written by rank 0 only) is described in training/rundir.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from training import distributed as D
from training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriter,
    config_from_checkpoint,
    load_checkpoint,
)
from training.config import (
    ARCHES,
    BACKWARDS,
    DEVICES,
    LIKELIHOODS,
    LR_SCHEDULES,
    MATMUL_PRECISIONS,
    OBJECTIVES,
    ConfigError,
    TrainConfig,
)
from training.data import DataError, DataSplits, load_data
from training.evaluate import heldout_sums, stats_from_sums
from training.mlp_step import MlpElboStep
from training.model import VAE, training_objective
from training.rundir import RunDir

logger = logging.getLogger(__name__)

# Flags that may differ from the checkpoint's config when resuming; all others must match.
RESUME_OVERRIDABLE: tuple[str, ...] = ("epochs", "time_budget_s", "patience", "device", "backward",
                                       "matmul_precision")
TIMING_KEYS: tuple[str, ...] = ("examples_per_s", "seconds")
# Flags of the command line that are not TrainConfig fields.
RUNTIME_FLAGS: tuple[str, ...] = ("out", "resume", "progress", "dist_timeout_s", "log_level")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunState:
    """What carries over from one epoch to the next (and is saved in the checkpoint)."""

    epoch: int = 0                       # epochs completed
    best_val_neg_elbo: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    train_seconds: float = 0.0           # wall-clock spent in epochs, over every session of the run
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(choice: str, ctx: D.DistContext) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def noise_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for epoch `epoch` on `rank`: eps ~ N(0, I) and binarisation draws."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch * 7_919 + rank) % 2**63)


def kl_weight(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """beta, ramped linearly from ~0 over the first `kl_warmup_epochs` epochs (per step)."""
    if config.kl_warmup_epochs <= 0:
        return config.beta
    done = epoch * steps + step + 1
    return config.beta * min(1.0, done / (config.kl_warmup_epochs * steps))


def lr_factor(config: TrainConfig, done_steps: int, steps_per_epoch: int, time_fraction: float) -> float:
    """The learning rate's multiplier before step `done_steps` (0-based, counted over the whole run).

    A linear warm-up over `lr_warmup_epochs`, then constant or a cosine decay to 0 over the run. The run's
    progress is the larger of the fraction of `epochs` done and the fraction of `time_budget_s` spent, so
    the decay ends when whichever limit stops the run is reached.
    """
    warmup = config.lr_warmup_epochs * steps_per_epoch
    if done_steps < warmup:
        return (done_steps + 1) / warmup
    assert config.lr_schedule != "auto", "lr_factor needs a resolved config"
    if config.lr_schedule == "constant":
        return 1.0
    by_steps = done_steps / (config.epochs * steps_per_epoch) if config.epochs else 0.0  # 0: no epoch limit
    progress = max(by_steps, time_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Clock:
    """Wall-clock spent training, across sessions of a resumed run, against `--time-budget-s`.

    Under torchrun every rank must stop at the same step and use the same learning rate, so with a
    budget the elapsed time is the maximum over ranks (one all-reduce of a scalar per step).
    """

    budget_s: float
    ctx: D.DistContext
    spent_before_s: float = 0.0  # training seconds of earlier sessions (from the checkpoint)
    reserve_s: float = 0.0       # the slowest validation so far: stop early enough to run one more
    t0: float = field(default_factory=time.perf_counter)

    def elapsed_s(self) -> float:
        t = self.spent_before_s + time.perf_counter() - self.t0
        if self.ctx.is_distributed and self.budget_s:
            t = float(D.all_reduce_max(torch.tensor(t, dtype=torch.float64), self.ctx))
        return t

    def fraction(self, elapsed_s: float) -> float:
        return elapsed_s / self.budget_s if self.budget_s else 0.0

    def out_of_time(self, elapsed_s: float) -> bool:
        return bool(self.budget_s) and elapsed_s + self.reserve_s >= self.budget_s


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


def checkpoint_state(vae: VAE, opt: torch.optim.Optimizer, config: TrainConfig, splits: DataSplits,
                     st: RunState, ctx: D.DistContext) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "config": config.to_dict(),
            "example_shape": list(splits.example_shape), "normalization": splits.normalization.to_dict(),
            "model": vae.state_dict(), "optimizer": opt.state_dict(), "epoch": st.epoch,
            "rng": {"scheme": "per-epoch generators seeded from (seed, epoch, rank)",
                    "torch_cpu": torch.get_rng_state()},
            "best_val_neg_elbo": st.best_val_neg_elbo, "best_epoch": st.best_epoch,
            "epochs_since_best": st.epochs_since_best, "train_seconds": st.train_seconds,
            "image_shape": list(splits.image_shape) if splits.image_shape else None,
            "data_source": splits.source, "world_size": ctx.world_size}


def fit(config: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
        dist_timeout_s: float = 300.0, explicit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Train according to `config` into run directory `out`; returns the summary (rank 0's view)."""
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    ctx = D.init_distributed("cuda" if wants_cuda else "cpu", dist_timeout_s)
    try:
        return _fit(config, RunDir(out), resume, progress, ctx, explicit)
    finally:
        D.shutdown_distributed(ctx)


def _fit(config: TrainConfig, run: RunDir, resume: bool, progress: bool, ctx: D.DistContext,
         explicit: frozenset[str]) -> dict[str, Any]:
    ckpt_path = run.checkpoint("last")
    state: dict[str, Any] | None = None
    if run.has_run() and not resume:
        raise CheckpointError(f"{run.path}: already holds a run ({ckpt_path.name}); pass --resume to continue it "
                              "or choose another --out")
    if resume and run.has_run():
        state = load_checkpoint(ckpt_path)
        config = _resumed_config(config_from_checkpoint(state, ckpt_path), config, explicit, ckpt_path)
    elif resume:
        logger.info("--resume: no %s yet, starting a new run", ckpt_path)
    if config.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size: the GLOBAL batch size ({config.batch_size}) must be divisible by the "
                          f"number of ranks ({ctx.world_size})")
    per_rank_batch = config.batch_size // ctx.world_size
    device = resolve_device(config.device, ctx)
    splits = load_data(config)
    config = config.resolved(math.prod(splits.example_shape), len(splits.train), ctx.world_size, device.type)
    torch.manual_seed(config.seed)  # parameter initialisation only; identical on every rank
    vae = VAE(config, splits.example_shape).to(device)
    opt = make_optimizer(vae, config, device)
    st = RunState()
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        st = RunState(epoch=int(state["epoch"]), best_val_neg_elbo=float(state["best_val_neg_elbo"]),
                      best_epoch=int(state.get("best_epoch", 0)),
                      epochs_since_best=int(state.get("epochs_since_best", 0)),
                      train_seconds=float(state.get("train_seconds", 0.0)),
                      history=run.read_metrics(upto_epoch=int(state["epoch"])))
        if state.get("world_size", ctx.world_size) != ctx.world_size:
            logger.warning("resuming a run made with %s ranks on %d ranks: later epochs shard differently",
                           state.get("world_size"), ctx.world_size)
        logger.info("resumed %s at epoch %d (best val -ELBO %.3f at epoch %d)", ckpt_path, st.epoch,
                    st.best_val_neg_elbo, st.best_epoch)
    model: nn.Module = vae
    if ctx.is_distributed:
        model = nn.parallel.DistributedDataParallel(
            vae, device_ids=[device.index] if device.type == "cuda" else None)
    x_train, x_val = splits.train.to(device), splits.val.to(device)
    if ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        run.write_metrics(st.history)
    logger.info("%s; %s %s latent %d on %s; %d rank(s), batch %d per rank, global batch %d; %d parameters; "
                "backward %s, matmul precision %s%s",
                splits.describe(), config.arch, list(config.hidden), config.latent_dim, device, ctx.world_size,
                per_rank_batch, per_rank_batch * ctx.world_size, sum(p.numel() for p in vae.parameters()),
                config.backward, config.matmul_precision,
                f"; time budget {config.time_budget_s:g} s" if config.time_budget_s else "")
    clock = Clock(config.time_budget_s, ctx, spent_before_s=st.train_seconds)
    writer = CheckpointWriter()
    stopped_by = "epochs"
    t_start = time.perf_counter()
    while not config.epochs or st.epoch < config.epochs:  # epochs 0: the time budget alone ends the run
        if config.patience and st.epochs_since_best >= config.patience:
            stopped_by = "patience"
            break
        if clock.out_of_time(clock.elapsed_s()):
            stopped_by = "time_budget"
            break
        epoch = st.epoch  # 0-based index of the epoch now running
        t0 = time.perf_counter()
        shard = D.epoch_shard(len(x_train), config.seed, epoch, ctx)
        steps = -(-len(shard) // per_rank_batch)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs or '-'}", unit="batch", leave=False,
                   disable=not (progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
        with bar:
            sums, taken = train_one_epoch(model, vae, opt, x_train, shard, per_rank_batch, config, epoch,
                                          noise_generator(config.seed, epoch, ctx.rank, device), clock, bar)
        if taken == 0:  # the budget ran out before this epoch's first step
            stopped_by = "time_budget"
            break
        sums = {k: D.all_reduce_sum(v, ctx) for k, v in sums.items()}
        train_seconds = time.perf_counter() - t0
        t_val = time.perf_counter()
        val = validate(vae, x_val, config, ctx)
        clock.reserve_s = max(clock.reserve_s, time.perf_counter() - t_val)  # the slowest validation so far
        n = float(sums["n"])
        row = {"epoch": epoch + 1, "steps": taken, "partial": taken < steps,
               "train_neg_elbo": float(sums["kl"] - sums["log_lik"]) / n,
               "train_recon_nll": -float(sums["log_lik"]) / n, "train_kl": float(sums["kl"]) / n,
               "val_neg_elbo": val["neg_elbo"], "val_recon_nll": -val["recon_log_lik"], "val_kl": val["kl"],
               "val_kl_per_dim": val["kl_per_dim"], "val_active_units": val["active_units"],
               "kl_weight": kl_weight(config, epoch, taken - 1, steps), "lr": opt.param_groups[0]["lr"],
               "examples_per_s": n / train_seconds, "seconds": time.perf_counter() - t0}
        if not (math.isfinite(row["train_neg_elbo"]) and math.isfinite(row["val_neg_elbo"])):
            raise TrainingDiverged(f"epoch {epoch + 1}: -ELBO is not finite (train {row['train_neg_elbo']}, "
                                   f"val {row['val_neg_elbo']}); lower --lr or set --grad-clip")
        st.epoch = epoch + 1
        st.train_seconds = clock.spent_before_s + time.perf_counter() - clock.t0
        improved = row["val_neg_elbo"] < st.best_val_neg_elbo
        if improved:
            st.best_val_neg_elbo, st.best_epoch, st.epochs_since_best = row["val_neg_elbo"], st.epoch, 0
        else:
            st.epochs_since_best += 1
        st.history.append(row)
        if ctx.is_main:
            run.append_metrics(row)
            writer.submit(checkpoint_state(vae, opt, config, splits, st, ctx),
                          [ckpt_path, run.checkpoint("best")] if improved else [ckpt_path])
        logger.info("epoch %d/%s%s  train -ELBO %.3f  val -ELBO %.3f (recon %.3f, KL %.3f, active %d/%d)  "
                    "kl-weight %.3g  lr %.3g  %.0f ex/s  %.2fs%s", st.epoch, config.epochs or "-",
                    f" ({taken}/{steps} steps)" if row["partial"] else "",
                    row["train_neg_elbo"], row["val_neg_elbo"], row["val_recon_nll"], row["val_kl"],
                    row["val_active_units"], config.latent_dim, row["kl_weight"], row["lr"],
                    row["examples_per_s"], row["seconds"], "  *best" if improved else "")
        if row["partial"]:
            stopped_by = "time_budget"
            break
    writer.close()
    D.barrier(ctx)  # every rank has finished its last checkpoint-visible step
    summary = _summary(config, splits, st, stopped_by, ctx, per_rank_batch, time.perf_counter() - t_start)
    if ctx.is_main:
        _finish(run, summary, splits, st.history)
    # Tear the process group down together: a gloo rank that destroys it and exits while rank 0 is still
    # writing figures was seen to abort ("terminate called without an active exception").
    D.barrier(ctx)
    return summary


def _resumed_config(saved: TrainConfig, given: TrainConfig, explicit: frozenset[str], path: Path) -> TrainConfig:
    """The checkpoint's config, with the few flags that may change on resume taken from the command line."""
    d = saved.to_dict()
    g = given.to_dict()
    for name in sorted(explicit):
        if name in RESUME_OVERRIDABLE:
            d[name] = g[name]
        elif name in d and d[name] != g[name]:
            raise ConfigError(f"--resume: {path} was trained with {name}={d[name]!r}, the command line says "
                              f"{g[name]!r}; only {', '.join(RESUME_OVERRIDABLE)} may change on resume")
    return TrainConfig.from_dict(d)


def _summary(config: TrainConfig, splits: DataSplits, st: RunState, stopped_by: str, ctx: D.DistContext,
             per_rank_batch: int, seconds: float) -> dict[str, Any]:
    last = st.history[-1] if st.history else {}
    return {"best_epoch": st.best_epoch, "best_val_neg_elbo": st.best_val_neg_elbo,
            "epochs_completed": st.epoch, "stopped_early": stopped_by == "patience", "stopped_by": stopped_by,
            "final": {k: v for k, v in last.items() if k not in TIMING_KEYS},
            "data": {"source": splits.source, "train": len(splits.train), "val": len(splits.val),
                     "test": len(splits.test), "example_shape": list(splits.example_shape),
                     "normalization": splits.normalization.kind},
            "world_size": ctx.world_size, "per_rank_batch_size": per_rank_batch,
            "global_batch_size": per_rank_batch * ctx.world_size, "seconds_this_session": seconds,
            "train_seconds": st.train_seconds, "time_budget_s": config.time_budget_s,
            "config": config.to_dict()}


def _finish(run: RunDir, summary: dict[str, Any], splits: DataSplits, history: list[dict[str, Any]]) -> None:
    """summary.json and the figures, from the best checkpoint."""
    from training import figures

    run.update_summary(summary)
    figures.write_all(run.path, run.load("best").model, splits, history, seed=summary["config"]["seed"])
    logger.info("best val -ELBO %.3f at epoch %d; run directory %s", summary["best_val_neg_elbo"],
                summary["best_epoch"], run.path)


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The one parser; with `suppress_defaults`, only flags given on the command line appear."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)

    def add(flag: str, default: Any, help: str, **kw: Any) -> None:
        if not suppress_defaults:
            kw["default"] = default
        p.add_argument(flag, help=help, **kw)

    add("--data", d.data, "digits | mnist:DIR | npy:FILE | images:DIR")
    add("--arch", d.arch, "encoder/decoder architecture", choices=ARCHES)
    add("--latent-dim", d.latent_dim, "latent dimensions d (0: a power of two near sqrt(input size), "
        "e.g. 8 for 8x8 digits, 32 for 28x28)", type=int)
    add("--hidden", list(d.hidden), "hidden layer sizes (mlp; conv uses the first); none given: scaled to the "
        "input (training.config.auto_hidden): 256 for 8x8 digits, 400 for 28x28", type=int, nargs="*")
    add("--conv-channels", list(d.conv_channels), "conv channels, one halving of H, W each", type=int, nargs="+")
    add("--likelihood", d.likelihood, "decoder P(x|z)", choices=LIKELIHOODS)
    add("--learn-variance", d.learn_variance, "Gaussian: learn a per-dimension variance",
        action=argparse.BooleanOptionalAction)
    add("--image-size", d.image_size, "images:DIR are resized to this square size", type=int)
    add("--binarize", d.binarize, "Bernoulli: dynamic binarisation of training batches",
        action=argparse.BooleanOptionalAction)
    add("--rescale", d.rescale, "Bernoulli: min-max scale float data outside [0, 1] (fitted on train)",
        action=argparse.BooleanOptionalAction)
    add("--epochs", d.epochs, "maximum number of epochs (and the length of the cosine schedule); 0: 150, or "
        "no limit when --time-budget-s is given", type=int)
    add("--time-budget-s", d.time_budget_s, "stop training after this many seconds of wall-clock (checked "
        "between steps; the last epoch may be partial), then finish as usual; 0: no limit", type=float)
    add("--batch-size", d.batch_size, "GLOBAL batch size (split evenly over torchrun ranks)", type=int)
    add("--lr", d.lr, "Adam learning rate (peak, after warm-up)", type=float)
    add("--lr-schedule", d.lr_schedule, "constant, or cosine decay to 0 over --epochs or --time-budget-s, "
        "whichever ends the run; auto: cosine from 4096 training examples up, constant below",
        choices=LR_SCHEDULES)
    add("--lr-warmup-epochs", d.lr_warmup_epochs, "ramp the learning rate linearly from 0 over this many epochs",
        type=int)
    add("--weight-decay", d.weight_decay, "Adam weight decay (L2, added to the gradient); 0: off", type=float)
    add("--objective", d.objective, "elbo, or iwae: the importance-weighted bound with --iwae-k samples",
        choices=OBJECTIVES)
    add("--iwae-k", d.iwae_k, "importance samples per example of --objective iwae", type=int)
    add("--beta", d.beta, "weight of the KL term (beta-VAE)", type=float)
    add("--kl-warmup-epochs", d.kl_warmup_epochs, "ramp the KL weight linearly from 0 over this many epochs",
        type=int)
    add("--free-bits", d.free_bits, "per-dimension KL floor in nats (training objective only)", type=float)
    add("--val-fraction", d.val_fraction, "fraction of examples for validation", type=float)
    add("--test-fraction", d.test_fraction, "fraction of examples for test (unless the data has a test file)",
        type=float)
    add("--seed", d.seed, "seed of the split, initialisation, shuffling and noise", type=int)
    add("--device", d.device, "training device", choices=DEVICES)
    add("--patience", d.patience, "stop after this many epochs without a better validation -ELBO (0: never)",
        type=int)
    add("--grad-clip", d.grad_clip, "clip the gradient norm to this (0: off)", type=float)
    add("--backward", d.backward, "manual: the hand-written forward/backward of the MLP ELBO (training/mlp_step.py; "
        "MLP, Bernoulli, --objective elbo, one process); autograd; auto: manual where it applies", choices=BACKWARDS)
    add("--matmul-precision", d.matmul_precision, "float32 matrix products of the training steps "
        "(torch.set_float32_matmul_precision; validation, test and export are always full float32): highest; "
        "medium: from bfloat16 operands (oneDNN, AMX); high: TF32 on CUDA; auto: medium for a Bernoulli MLP whose "
        "largest product has 8M+ multiply-adds a step on a CPU with AMX-BF16, else highest", choices=MATMUL_PRECISIONS)
    add("--out", "runs/latest", "run directory (written by rank 0 only)", type=Path)
    add("--resume", False, "continue from OUT/checkpoint.pt if it exists", action="store_true")
    add("--progress", True, "show a progress bar per epoch", action=argparse.BooleanOptionalAction)
    add("--dist-timeout-s", 300.0, "timeout of every collective under torchrun, so a dead rank fails the job "
        "instead of hanging it", type=float)
    add("--log-level", "INFO", "logging level")
    return p



def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    return TrainConfig(**values)


@record  # under torchrun, a failing rank's traceback is reported in the job's error summary
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = frozenset(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=args.log_level if rank == 0 else "WARNING",
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        fit(config, args.out, resume=args.resume, progress=args.progress, dist_timeout_s=args.dist_timeout_s,
            explicit=explicit)
    except (ConfigError, DataError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    except TrainingDiverged as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
