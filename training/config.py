"""Training configuration: one dataclass, saved in every checkpoint and carried into the export manifest.

A model always says how it was made: `TrainConfig` is written to `RUN_DIR/config.json`, stored in
`checkpoint.pt` / `best.pt` under the key ``"config"``, and copied into `exported/model.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Arch = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]
DeviceChoice = Literal["auto", "cpu", "cuda"]

ARCHES: tuple[str, ...] = ("mlp", "conv")
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults train a small MLP VAE on scikit-learn's digits."""

    data: str = "digits"
    arch: Arch = "mlp"
    latent_dim: int = 8
    hidden: tuple[int, ...] = (256, 128)
    conv_channels: tuple[int, ...] = (32, 64)
    likelihood: Likelihood = "bernoulli"
    learn_variance: bool = False
    image_size: int = 28
    binarize: bool = False
    # Bernoulli on float data outside [0, 1]: min-max scale from the training split instead of failing.
    rescale: bool = False
    epochs: int = 150
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    free_bits: float = 0.0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    device: DeviceChoice = "auto"
    patience: int = 0
    grad_clip: float = 0.0
    iwae_k: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        checks: list[tuple[str, bool, str]] = [
            ("arch", self.arch in ARCHES, f"one of {ARCHES}"),
            ("likelihood", self.likelihood in LIKELIHOODS, f"one of {LIKELIHOODS}"),
            ("device", self.device in DEVICES, f"one of {DEVICES}"),
            ("latent_dim", self.latent_dim >= 1, "an integer >= 1"),
            ("hidden", len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
             "one or more integers >= 1"),
            ("conv_channels", len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
             "one or more integers >= 1"),
            ("image_size", self.image_size >= 4, "an integer >= 4"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a number > 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("beta", self.beta >= 0, "a number >= 0"),
            ("kl_warmup_epochs", self.kl_warmup_epochs >= 0, "an integer >= 0"),
            ("free_bits", self.free_bits >= 0, "a number >= 0 (nats per latent dimension)"),
            ("val_fraction", 0 < self.val_fraction < 1, "a fraction in (0, 1)"),
            ("test_fraction", 0 <= self.test_fraction < 1, "a fraction in [0, 1)"),
            ("val_fraction + test_fraction", self.val_fraction + self.test_fraction < 1, "a sum < 1"),
            ("patience", self.patience >= 0, "an integer >= 0 (0 disables early stopping)"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 disables clipping)"),
            ("iwae_k", self.iwae_k >= 1, "an integer >= 1"),
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

    # Fields that fix the shape of the parameters: a checkpoint can only be loaded into a model
    # built with the same values.
    ARCHITECTURE_FIELDS: ClassVar[tuple[str, ...]] = (
        "arch", "latent_dim", "hidden", "conv_channels", "likelihood", "learn_variance")
