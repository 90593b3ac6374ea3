"""A training run: set up (or resume) a session, run epochs until a limit stops it, write the results.

`fit` is what `python -m training.fit` calls (training/fit.py holds its command line). Each epoch runs
training.epoch's steps and validation; the run keeps the checkpoint with the best validation -ELBO
(best.pt) beside the last one, stops at `--epochs`, `--patience` or `--time-budget-s` (training.schedule's
Clock), and writes summary.json and the figures. The run directory (written by rank 0 only) is described
in training/rundir.py.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from training import distributed as D
from training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriter,
    config_from_checkpoint,
    load_checkpoint,
)
from training.config import ConfigError, TrainConfig
from training.data import DataSplits, load_data
from training.epoch import make_optimizer, noise_generator, train_one_epoch, validate
from training.model import VAE
from training.rundir import RunDir
from training.schedule import Clock, kl_weight

logger = logging.getLogger(__name__)

# Flags that may differ from the checkpoint's config when resuming; all others must match.
RESUME_OVERRIDABLE: tuple[str, ...] = ("epochs", "time_budget_s", "patience", "device", "backward",
                                       "matmul_precision")
TIMING_KEYS: tuple[str, ...] = ("examples_per_s", "seconds")


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


@dataclass
class Session:
    """What one session of a run trains with: the resolved config, the data and model on the device."""

    config: TrainConfig
    splits: DataSplits
    device: torch.device
    per_rank_batch: int
    vae: VAE
    model: nn.Module  # the VAE, or its DDP wrapper under torchrun
    opt: torch.optim.Optimizer
    st: RunState
    x_train: Tensor  # (N, *shape) on the device
    x_val: Tensor


def resolve_device(choice: str, ctx: D.DistContext) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


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
    s = _start_session(config, run, resume, ctx, explicit)
    config, st = s.config, s.st
    if ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        run.write_metrics(st.history)
    logger.info("%s; %s %s latent %d on %s; %d rank(s), batch %d per rank, global batch %d; %d parameters; "
                "backward %s, matmul precision %s%s",
                s.splits.describe(), config.arch, list(config.hidden), config.latent_dim, s.device,
                ctx.world_size, s.per_rank_batch, s.per_rank_batch * ctx.world_size,
                sum(p.numel() for p in s.vae.parameters()), config.backward, config.matmul_precision,
                f"; time budget {config.time_budget_s:g} s" if config.time_budget_s else "")
    t_start = time.perf_counter()
    stopped_by = _run_epochs(s, run, progress, ctx)
    D.barrier(ctx)  # every rank has finished its last checkpoint-visible step
    summary = _summary(config, s.splits, st, stopped_by, ctx, s.per_rank_batch, time.perf_counter() - t_start)
    if ctx.is_main:
        _finish(run, summary, s.splits, st.history)
    # Tear the process group down together: a gloo rank that destroys it and exits while rank 0 is still
    # writing figures was seen to abort ("terminate called without an active exception").
    D.barrier(ctx)
    return summary


def _start_session(config: TrainConfig, run: RunDir, resume: bool, ctx: D.DistContext,
                   explicit: frozenset[str]) -> Session:
    """The config (the checkpoint's when resuming), data, model and optimizer, restored from the last
    checkpoint when resuming."""
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
    return Session(config=config, splits=splits, device=device, per_rank_batch=per_rank_batch, vae=vae,
                   model=model, opt=opt, st=st, x_train=splits.train.to(device), x_val=splits.val.to(device))


def _run_epochs(s: Session, run: RunDir, progress: bool, ctx: D.DistContext) -> str:
    """Epochs until a limit stops the run, each checkpointed (rank 0); returns what stopped it."""
    config, st = s.config, s.st
    clock = Clock(config.time_budget_s, ctx, spent_before_s=st.train_seconds)
    writer = CheckpointWriter()
    stopped_by = "epochs"
    while not config.epochs or st.epoch < config.epochs:  # epochs 0: the time budget alone ends the run
        if config.patience and st.epochs_since_best >= config.patience:
            stopped_by = "patience"
            break
        if clock.out_of_time(clock.elapsed_s()):
            stopped_by = "time_budget"
            break
        epoch = st.epoch  # 0-based index of the epoch now running
        t0 = time.perf_counter()
        shard = D.epoch_shard(len(s.x_train), config.seed, epoch, ctx)
        steps = -(-len(shard) // s.per_rank_batch)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs or '-'}", unit="batch", leave=False,
                   disable=not (progress and ctx.is_main), file=sys.stderr, dynamic_ncols=True)
        with bar:
            sums, taken = train_one_epoch(s.model, s.vae, s.opt, s.x_train, shard, s.per_rank_batch, config, epoch,
                                          noise_generator(config.seed, epoch, ctx.rank, s.device), clock, bar)
        if taken == 0:  # the budget ran out before this epoch's first step
            stopped_by = "time_budget"
            break
        sums = {k: D.all_reduce_sum(v, ctx) for k, v in sums.items()}
        train_seconds = time.perf_counter() - t0
        t_val = time.perf_counter()
        val = validate(s.vae, s.x_val, config, ctx)
        clock.reserve_s = max(clock.reserve_s, time.perf_counter() - t_val)  # the slowest validation so far
        n = float(sums["n"])
        row = {"epoch": epoch + 1, "steps": taken, "partial": taken < steps,
               "train_neg_elbo": float(sums["kl"] - sums["log_lik"]) / n,
               "train_recon_nll": -float(sums["log_lik"]) / n, "train_kl": float(sums["kl"]) / n,
               "val_neg_elbo": val["neg_elbo"], "val_recon_nll": -val["recon_log_lik"], "val_kl": val["kl"],
               "val_kl_per_dim": val["kl_per_dim"], "val_active_units": val["active_units"],
               "kl_weight": kl_weight(config, epoch, taken - 1, steps), "lr": s.opt.param_groups[0]["lr"],
               "examples_per_s": n / train_seconds, "seconds": time.perf_counter() - t0}
        st.train_seconds = clock.spent_before_s + time.perf_counter() - clock.t0
        _end_epoch(s, run, writer, row, steps, ctx)
        if row["partial"]:
            stopped_by = "time_budget"
            break
    writer.close()
    return stopped_by


def _end_epoch(s: Session, run: RunDir, writer: CheckpointWriter, row: dict[str, Any], steps: int,
               ctx: D.DistContext) -> None:
    """Refuse a diverged epoch, else record it: run state, metrics.jsonl, checkpoints (rank 0), the log line."""
    config, st = s.config, s.st
    if not (math.isfinite(row["train_neg_elbo"]) and math.isfinite(row["val_neg_elbo"])):
        raise TrainingDiverged(f"epoch {row['epoch']}: -ELBO is not finite (train {row['train_neg_elbo']}, "
                               f"val {row['val_neg_elbo']}); lower --lr or set --grad-clip")
    st.epoch = row["epoch"]
    improved = row["val_neg_elbo"] < st.best_val_neg_elbo
    if improved:
        st.best_val_neg_elbo, st.best_epoch, st.epochs_since_best = row["val_neg_elbo"], st.epoch, 0
    else:
        st.epochs_since_best += 1
    st.history.append(row)
    ckpt_path = run.checkpoint("last")
    if ctx.is_main:
        run.append_metrics(row)
        writer.submit(checkpoint_state(s.vae, s.opt, config, s.splits, st, ctx),
                      [ckpt_path, run.checkpoint("best")] if improved else [ckpt_path])
    logger.info("epoch %d/%s%s  train -ELBO %.3f  val -ELBO %.3f (recon %.3f, KL %.3f, active %d/%d)  "
                "kl-weight %.3g  lr %.3g  %.0f ex/s  %.2fs%s", st.epoch, config.epochs or "-",
                f" ({row['steps']}/{steps} steps)" if row["partial"] else "",
                row["train_neg_elbo"], row["val_neg_elbo"], row["val_recon_nll"], row["val_kl"],
                row["val_active_units"], config.latent_dim, row["kl_weight"], row["lr"],
                row["examples_per_s"], row["seconds"], "  *best" if improved else "")


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
