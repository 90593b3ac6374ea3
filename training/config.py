"""Training configuration: one dataclass, saved in every checkpoint and carried into the export manifest.

A model always says how it was made: `TrainConfig` is written to `RUN_DIR/config.json`, stored in
`checkpoint.pt` / `best.pt` under the key ``"config"``, and copied into `exported/model.json`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
Objective = Literal["elbo", "iwae"]
LrSchedule = Literal["auto", "constant", "cosine"]
Backward = Literal["auto", "manual", "autograd"]
MatmulPrecision = Literal["auto", "highest", "high", "medium"]

ARCHES: tuple[str, ...] = ("mlp", "conv")
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
OBJECTIVES: tuple[str, ...] = ("elbo", "iwae")
LR_SCHEDULES: tuple[str, ...] = ("auto", "constant", "cosine")
BACKWARDS: tuple[str, ...] = ("auto", "manual", "autograd")
MATMUL_PRECISIONS: tuple[str, ...] = ("auto", "highest", "high", "medium")
# lr_schedule "auto": cosine from this many training examples up, constant below (see auto_lr_schedule).
COSINE_MIN_TRAIN_EXAMPLES = 4096
CHECKPOINT_CHOICES: tuple[str, ...] = ("best", "last")
DEFAULT_EPOCHS = 150  # `epochs` 0 without a time budget


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


def auto_hidden(n_in: int) -> tuple[int, ...]:
    """Hidden sizes for `n_in` input dimensions when `--hidden` is not given (measured: BENCHMARKS.md, training).

    One layer of about half the input, rounded to a multiple of 100 and clamped to [256, 1000]: 64 inputs
    (8x8 digits) -> 256, 784 (28x28) -> 400. At the same wall-clock a second layer cost more per epoch than
    it gained: on MNIST one 400 layer beat (512,), (400, 200) and (512, 256); on digits one 256 layer
    matched or beat the former default (256, 128).
    """
    return (int(min(1000, max(256, round(n_in / 200) * 100))),)


def auto_latent_dim(n_in: int) -> int:
    """Latent dimensions for `n_in` inputs when `--latent-dim` is not given: a power of two near
    sqrt(n_in), in [2, 64]: 64 -> 8, 784 -> 32."""
    return int(min(64, max(2, 2 ** round(math.log2(math.sqrt(n_in))))))


def auto_backward(config: TrainConfig, world_size: int) -> Backward:
    """The step for `--backward auto`: the hand-written one (training/mlp_step.py; 1.14x autograd's examples/s
    in benchmarks/train_loop.py at batch 128 on one CPU core, 1.35x per step in isolation: BENCHMARKS.md) where
    it is written for the run (MLP, Bernoulli, the ELBO, one process), autograd elsewhere."""
    manual = (config.arch == "mlp" and config.likelihood == "bernoulli" and config.objective == "elbo"
              and world_size == 1)
    return "manual" if manual else "autograd"


# `--matmul-precision auto` picks "medium" only when the MLP's largest matrix product of a step (per-rank batch x
# inputs x outputs of its widest Linear) has at least this many multiply-adds: on the AMX Xeon of BENCHMARKS.md
# (python -m benchmarks.matmul_precision) bfloat16 products were 1.4-2.2x faster from 8M up, 1.0-1.4x at 2-5M
# and slower below (8x8 digits' 64-256 layer at batch 128: 2.1M, 0.93x; its whole step 1.4x slower).
BF16_MIN_PRODUCT_MACS = 8_000_000


def mlp_sizes(config: TrainConfig, n_in: int) -> tuple[list[int], list[int]]:
    """The MLP's layer widths, input to output: the encoder's (to mu and log-variance) and the decoder's."""
    d = config.latent_dim
    return [n_in, *config.hidden, 2 * d], [d, *reversed(config.hidden), n_in]


def largest_product_macs(config: TrainConfig, n_in: int, per_rank_batch: int) -> int:
    """Multiply-adds of the largest matrix product in a training step's forward of the MLP `config` describes
    (hidden and latent resolved); 0 for what `--matmul-precision auto` keeps in float32 whatever the size: the
    conv model, whose time is in its convolutions, and the Gaussian decoder, whose quality under bfloat16
    products was not measured."""
    if config.arch != "mlp" or config.likelihood != "bernoulli":
        return 0
    return per_rank_batch * max(a * b for dims in mlp_sizes(config, n_in) for a, b in itertools.pairwise(dims))


def auto_matmul_precision(device_type: str, product_macs: int) -> MatmulPrecision:
    """`--matmul-precision auto`: "medium" (float32 matrix products computed from bfloat16 operands with float32
    accumulation, oneDNN on the CPU's AMX units) on a CPU with AMX-BF16 when the step's largest product has at
    least BF16_MIN_PRODUCT_MACS multiply-adds, "highest" (full float32) elsewhere.

    Measured (BENCHMARKS.md, training): on a 2-core Xeon with AMX the 784-400-20 loop at batch 128 ran
    1.34-1.39x faster (benchmarks.train_loop) and validation -ELBO over 60 epochs was unchanged (3 seeds,
    Bernoulli). Without AMX the bfloat16 products are not known to pay, and CUDA (where "high" means TF32)
    was not measured: both stay at full float32 unless asked (and see largest_product_macs).
    """
    if device_type != "cpu" or product_macs < BF16_MIN_PRODUCT_MACS:
        return "highest"
    import torch  # the config module stays importable without torch

    caps = torch.cpu.get_capabilities()
    return "medium" if caps.get("amx_bf16") and caps.get("amx_tile") else "highest"


def auto_lr_schedule(n_train: int) -> LrSchedule:
    """The schedule for `--lr-schedule auto` (measured, BENCHMARKS.md): a cosine decay to 0 gained 2.8 nats
    of validation -ELBO over a constant rate on 7,200 MNIST digits at the same wall-clock, but cost about
    0.25 nats on 1,293 8x8 digits, where a run is short in steps and still improving at its end."""
    return "cosine" if n_train >= COSINE_MIN_TRAIN_EXAMPLES else "constant"


@dataclass
class TrainConfig:
    """Every knob of a training run. `hidden=()`, `latent_dim=0` and `lr_schedule="auto"` mean "chosen from
    the data" (`auto_hidden`, `auto_latent_dim`, `auto_lr_schedule`); `resolved` fills them in and the run
    saves the filled-in values."""

    data: str = "digits"
    arch: Arch = "mlp"
    latent_dim: int = 0
    hidden: tuple[int, ...] = ()
    conv_channels: tuple[int, ...] = (32, 64)
    likelihood: Likelihood = "bernoulli"
    learn_variance: bool = False
    image_size: int = 28
    binarize: bool = False
    # Bernoulli on float data outside [0, 1]: min-max scale from the training split instead of failing.
    rescale: bool = False
    # 0: DEFAULT_EPOCHS without a time budget, no epoch limit with one (the budget ends the run).
    epochs: int = 0
    # Stop training once this many seconds have passed (checked between steps); 0: no limit.
    time_budget_s: float = 0.0
    batch_size: int = 128
    lr: float = 3e-3
    lr_schedule: LrSchedule = "auto"
    lr_warmup_epochs: int = 1
    # Adam's L2 term (coupled). Measured (BENCHMARKS.md): on 7,200 MNIST digits, 118 epochs, 1e-3 gave 0.64 nats
    # better test -ELBO than 0 (1e-4: 0.30; 3e-3: 0.56; 1e-2: 0.61 worse); on 8x8 digits it changed nothing.
    weight_decay: float = 1e-3
    objective: Objective = "elbo"
    iwae_k: int = 5
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    free_bits: float = 0.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    device: DeviceChoice = "auto"
    patience: int = 0
    grad_clip: float = 0.0
    # How gradients are computed: manual (training/mlp_step.py), autograd, or auto (manual where it applies).
    backward: Backward = "auto"
    # torch.set_float32_matmul_precision for the training steps only (validation, test and export are always
    # full float32); auto: see auto_matmul_precision.
    matmul_precision: MatmulPrecision = "auto"

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        checks: list[tuple[str, bool, str]] = [
            ("arch", self.arch in ARCHES, f"one of {ARCHES}"),
            ("likelihood", self.likelihood in LIKELIHOODS, f"one of {LIKELIHOODS}"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("objective", self.objective in OBJECTIVES, f"one of {OBJECTIVES}"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
            ("backward", self.backward in BACKWARDS, f"one of {BACKWARDS}"),
            ("matmul_precision", self.matmul_precision in MATMUL_PRECISIONS, f"one of {MATMUL_PRECISIONS}"),
            ("latent_dim", self.latent_dim >= 0, "an integer >= 1 (0: chosen from the input size)"),
            ("hidden", all(h >= 1 for h in self.hidden), "integers >= 1 (none: chosen from the input size)"),
            ("conv_channels", len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
             "one or more integers >= 1"),
            ("image_size", self.image_size >= 4, "an integer >= 4"),
            ("epochs", self.epochs >= 0, "an integer >= 1 (0: 150, or no limit with a time budget)"),
            ("time_budget_s", self.time_budget_s >= 0, "a number of seconds >= 0 (0: no limit)"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a number > 0"),
            ("lr_warmup_epochs", self.lr_warmup_epochs >= 0, "an integer >= 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("iwae_k", self.iwae_k >= 1, "an integer >= 1"),
            ("beta", self.beta >= 0, "a number >= 0"),
            ("kl_warmup_epochs", self.kl_warmup_epochs >= 0, "an integer >= 0"),
            ("free_bits", self.free_bits >= 0, "a number >= 0 (nats per latent dimension)"),
            ("val_fraction", 0 < self.val_fraction < 1, "a fraction in (0, 1)"),
            ("test_fraction", 0 <= self.test_fraction < 1, "a fraction in [0, 1)"),
            ("val_fraction + test_fraction", self.val_fraction + self.test_fraction < 1, "a sum < 1"),
            ("patience", self.patience >= 0, "an integer >= 0 (0 disables early stopping)"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 disables clipping)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name, None) if "+" not in name else (self.val_fraction + self.test_fraction)
                raise ConfigError(f"{name}: expected {expected}, got {value!r}")
        if self.learn_variance and self.likelihood != "gaussian":
            raise ConfigError("learn_variance: only valid with likelihood 'gaussian', got likelihood "
                              f"{self.likelihood!r}")
        if self.binarize and self.likelihood != "bernoulli":
            raise ConfigError(f"binarize: only valid with likelihood 'bernoulli', got {self.likelihood!r}")
        if self.objective == "iwae":
            for name, neutral in (("beta", 1.0), ("kl_warmup_epochs", 0), ("free_bits", 0.0)):
                if getattr(self, name) != neutral:
                    raise ConfigError(f"{name}: the iwae objective is the plain importance-weighted bound; "
                                      f"expected {neutral!r}, got {getattr(self, name)!r}")

    def resolved(self, n_in: int, n_train: int, world_size: int = 1, device_type: str = "cpu") -> TrainConfig:
        """This config with what was left open chosen: `hidden` and `latent_dim` from `n_in` input dimensions,
        `lr_schedule` "auto" from `n_train` training examples, `epochs` 0 as DEFAULT_EPOCHS unless a time
        budget ends the run (then 0 stays: no epoch limit), `backward` "auto" from the model and
        `world_size` ranks, `matmul_precision` "auto" from the training device and the model's size."""
        if self.backward == "manual" and auto_backward(self, world_size) != "manual":
            raise ConfigError("backward: 'manual' is written for arch 'mlp', likelihood 'bernoulli', objective "
                              f"'elbo' in one process; got arch {self.arch!r}, likelihood {self.likelihood!r}, "
                              f"objective {self.objective!r}, {world_size} rank(s); use 'auto' or 'autograd'")
        out = dataclasses.replace(self, hidden=self.hidden or auto_hidden(n_in),
                                  epochs=self.epochs or (0 if self.time_budget_s else DEFAULT_EPOCHS),
                                  latent_dim=self.latent_dim or auto_latent_dim(n_in),
                                  lr_schedule=auto_lr_schedule(n_train) if self.lr_schedule == "auto"
                                  else self.lr_schedule,
                                  backward=auto_backward(self, world_size) if self.backward == "auto"
                                  else self.backward)
        if out.matmul_precision == "auto":
            macs = largest_product_macs(out, n_in, max(1, out.batch_size // world_size))
            out = dataclasses.replace(out, matmul_precision=auto_matmul_precision(device_type, macs))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["conv_channels"] = list(self.conv_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}; this version knows {sorted(known)}")
        return cls(**d)
