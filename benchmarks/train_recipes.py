"""Benchmark (issue 18): the pytorch/examples VAE recipe against training.fit's defaults, same data, same
wall-clock, scored alike through ONNX Runtime on the exported models.

    python -m benchmarks.train_recipes [--datasets mnist digits] [--example-epochs 60] [--cpu 1]

For each dataset (MNIST: the 10,000 t10k digits in ../shared/data/mnist, split 8,000 train / 2,000 test
with seed 0; digits: scikit-learn's 1,797 8x8 digits, split 1,437 / 360), written as .npy files that
training.fit reads with `npy:` as a new user would:

1. example  a faithful re-implementation of pytorch/examples vae/main.py (fc1 784-400, fc21/fc22 400-20,
            fc3 20-400, fc4 400-784, ReLU, sigmoid output, BCE-sum + KL, Adam 1e-3, batch 128,
            DataLoader(TensorDataset, shuffle=True), its per-epoch test pass; image saving left out),
            60 epochs, timed: T seconds of training (its test passes included);
2. defaults `python -m training.fit --data npy:train.npy --test-fraction 0 --time-budget-s T` (every other
            flag at its default);
3. previous defaults: the defaults before issue 18 (256-128, latent 8, Adam 3e-3 constant, batch 64) with the
            same `--time-budget-s T`; on digits (seconds only) also for 60 epochs, whatever time they take.

Every model is exported with `python -m training.export` (the example's weights are copied into the
identical VAE first; the exports run in the background on --export-cpu) and scored on the test split by
ONNX Runtime: grey pixels in [0, 1] as Bernoulli
targets, test -ELBO averaged over 8 z samples, the IWAE bound with k = 100, and active units
(Var_x E_q[z] > 0.01, as training.evaluate). Every training run is pinned to --cpu with one torch thread.
Writes benchmarks/results/train_recipes.json and prints the tables. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_recipes.json"
WORK = REPO / "runs" / "bench" / "recipes"
MNIST = REPO.parent / "shared" / "data" / "mnist"
ELBO_SAMPLES, IWAE_K, ACTIVE_THRESHOLD = 8, 100, 0.01
PREVIOUS_DEFAULTS = ["--hidden", "256", "128", "--latent-dim", "8", "--lr", "3e-3", "--batch-size", "64",
                     "--lr-schedule", "constant", "--lr-warmup-epochs", "0", "--weight-decay", "0"]


def log(msg: str) -> None:
    print(f"[recipes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------

def prepare(name: str, out: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Write OUT/train.npy (as a user would hand it to training.fit); return it and the test split in [0, 1]."""
    from training.data import read_digits, read_mnist

    if name == "mnist":
        raw, n_train, scale = read_mnist(MNIST).x, 8000, 255.0  # (10000, 28, 28) uint8
    elif name == "digits":
        raw, n_train, scale = read_digits().x, 1437, 16.0  # (1797, 8, 8) float 0..16
    else:
        raise ValueError(f"dataset: expected mnist or digits, got {name!r}")
    perm = np.random.default_rng(seed).permutation(len(raw))
    train, test = raw[perm[:n_train]], raw[perm[n_train:]]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.npy"
    # MNIST stays uint8 (training.data scales it by 1/255); digits go in as floats in [0, 1].
    np.save(path, train if raw.dtype == np.uint8 else (train / scale).astype(np.float32))
    return path, (test.reshape(len(test), -1) / scale).astype(np.float32)


# -- the pytorch/examples recipe -----------------------------------------------------------------------

class ExampleVAE(nn.Module):
    """pytorch/examples vae/main.py's model, generalised from 784 inputs to `n_in`."""

    def __init__(self, n_in: int = 784) -> None:
        super().__init__()
        self.n_in = n_in
        self.fc1 = nn.Linear(n_in, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, n_in)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, self.n_in))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def example_loss(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[1]), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def example_train_epoch(model: ExampleVAE, optimizer: torch.optim.Optimizer,
                        train_loader: DataLoader) -> float:  # type: ignore[type-arg]
    """main.py's train(): returns the average loss per example."""
    model.train()
    train_loss = 0.0
    for (data,) in train_loader:
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = example_loss(recon_batch, data, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
    return train_loss / len(train_loader.dataset)  # type: ignore[arg-type]


def example_test_epoch(model: ExampleVAE, test_loader: DataLoader) -> float:  # type: ignore[type-arg]
    """main.py's test() (without its image saving)."""
    model.eval()
    test_loss = 0.0
    with torch.no_grad():
        for (data,) in test_loader:
            recon_batch, mu, logvar = model(data)
            test_loss += example_loss(recon_batch, data, mu, logvar).item()
    return test_loss / len(test_loader.dataset)  # type: ignore[arg-type]


def run_example(x_train: np.ndarray, x_test: np.ndarray, epochs: int, seed: int = 1) -> tuple[ExampleVAE, float]:
    """main.py's recipe: `epochs` of train() + test(); returns the model and the seconds they took."""
    torch.manual_seed(seed)  # main.py's default --seed 1
    train_loader = DataLoader(TensorDataset(torch.from_numpy(x_train)), batch_size=128, shuffle=True)
    test_loader = DataLoader(TensorDataset(torch.from_numpy(x_test)), batch_size=128, shuffle=False)
    model = ExampleVAE(x_train.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        example_train_epoch(model, optimizer, train_loader)
        example_test_epoch(model, test_loader)
    return model, time.perf_counter() - t0


def example_as_run(model: ExampleVAE, data: str, run: Path) -> None:
    """Write the example's weights as a training.fit run directory (best.pt) of the identical VAE."""
    from training.checkpoint import FORMAT_VERSION, save_checkpoint
    from training.config import TrainConfig
    from training.data import load_data
    from training.model import VAE
    from training.rundir import RunDir

    config = TrainConfig(data=data, hidden=(400,), latent_dim=20, batch_size=128, lr=1e-3, lr_schedule="constant",
                         lr_warmup_epochs=0, test_fraction=0.0)
    splits = load_data(config)
    vae = VAE(config, splits.example_shape)
    sd = model.state_dict()
    vae.load_state_dict({
        "encoder_body.0.weight": sd["fc1.weight"], "encoder_body.0.bias": sd["fc1.bias"],
        # the VAE's last encoder layer outputs (mu, logvar) stacked: fc21 above fc22
        "encoder_body.2.weight": torch.cat([sd["fc21.weight"], sd["fc22.weight"]]),
        "encoder_body.2.bias": torch.cat([sd["fc21.bias"], sd["fc22.bias"]]),
        "decoder_body.0.weight": sd["fc3.weight"], "decoder_body.0.bias": sd["fc3.bias"],
        "decoder_body.2.weight": sd["fc4.weight"], "decoder_body.2.bias": sd["fc4.bias"]})
    save_checkpoint(RunDir(run).checkpoint("best"), {
        "format_version": FORMAT_VERSION, "config": config.to_dict(), "example_shape": list(splits.example_shape),
        "normalization": splits.normalization.to_dict(), "model": vae.state_dict(), "epoch": 0})


# -- the scorer --------------------------------------------------------------------------------------

def _softplus(v: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, v)


def score_onnx(model_dir: Path, x: np.ndarray, seed: int = 0, batch: int = 100) -> dict[str, float]:
    """Test metrics of an exported model (ONNX Runtime, CPU, one thread) on x (N, D) in [0, 1]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    enc = ort.InferenceSession(str(model_dir / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(model_dir / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    neg_elbo, iwae, mus = [], [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]  # (b, D)
        mu, logvar = (a.astype(np.float64) for a in enc.run(["mu", "logvar"], {"x": xb}))  # (b, d)
        mus.append(mu)
        kl = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(axis=1)  # (b,)
        k = max(ELBO_SAMPLES, IWAE_K)
        eps = rng.standard_normal((k, *mu.shape))  # (k, b, d)
        z = mu + np.exp(0.5 * logvar) * eps
        (logits,) = dec.run(["logits"], {"z": z.reshape(-1, z.shape[-1]).astype(np.float32)})
        logits = logits.astype(np.float64).reshape(k, len(xb), -1)  # (k, b, D)
        log_px_z = (xb * logits - _softplus(logits)).sum(axis=2)  # (k, b)
        neg_elbo.append(kl - log_px_z[:ELBO_SAMPLES].mean(axis=0))
        log_w = log_px_z[:IWAE_K] - 0.5 * (z[:IWAE_K] ** 2 - eps[:IWAE_K] ** 2 - logvar).sum(axis=2)
        m = log_w.max(axis=0)
        iwae.append(m + np.log(np.exp(log_w - m).mean(axis=0)))
    mu_all = np.concatenate(mus)
    return {"test_neg_elbo": float(np.concatenate(neg_elbo).mean()),
            "iwae_nll": float(-np.concatenate(iwae).mean()),
            "active_units": int((mu_all.var(axis=0) > ACTIVE_THRESHOLD).sum()), "latent_dim": mu_all.shape[1]}


# -- the runs ----------------------------------------------------------------------------------------

def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None and shutil.which("taskset") else cmd


def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


class Exports:
    """`python -m training.export` runs in the background on another CPU, overlapping the next training run
    (an export takes tens of seconds, mostly the dynamo exporter); `scored` waits for each and scores it."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}

    def start(self, key: str, run: Path) -> None:
        out = run / "exported"
        cmd = pinned(self.cpu, [sys.executable, "-m", "training.export", "--run", str(run), "--out", str(out)])
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.procs[key] = (subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT), out)

    def scored(self, key: str, x_test: np.ndarray) -> dict[str, float]:
        proc, out = self.procs.pop(key)
        text, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"training.export for {key} exited {proc.returncode}:\n{text[-3000:]}")
        return score_onnx(out, x_test)


def fit_run(name: str, data_path: Path, run: Path, flags: list[str], cpu: int | None) -> dict[str, Any]:
    """`python -m training.fit` on the .npy file, timed from outside; returns its summary and timings."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.fit", "--data", f"npy:{data_path}", "--test-fraction", "0", "--seed", "0",
           "--device", "cpu", "--no-progress", "--log-level", "WARNING", *flags, "--out", str(run)]
    log(f"{name}: training.fit {' '.join(flags)}")
    t0 = time.perf_counter()
    sh(pinned(cpu, cmd), 1800)
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    return {"command": "python -m training.fit " + " ".join(cmd[3:-2]).replace(str(REPO) + "/", "") + " --out RUN",
            "process_wall_s": wall, "train_seconds": summary["train_seconds"],
            "epochs": summary["epochs_completed"], "best_epoch": summary["best_epoch"],
            "stopped_by": summary["stopped_by"], "config": summary["config"],
            "final_train_neg_elbo": summary["final"]["train_neg_elbo"],
            "best_val_neg_elbo": summary["best_val_neg_elbo"]}


def bench_dataset(name: str, example_epochs: int, cpu: int | None, export_cpu: int | None) -> dict[str, Any]:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    data_path, x_test = prepare(name, work)
    x_train = np.load(data_path).reshape(len(np.load(data_path)), -1)
    x_train = (x_train / 255.0 if x_train.dtype == np.uint8 else x_train).astype(np.float32)
    rows: dict[str, Any] = {}
    exports = Exports(export_cpu)

    log(f"{name}: the pytorch/examples recipe, {example_epochs} epochs")
    model, seconds = run_example(x_train, x_test, example_epochs)
    example_run = work / "example"
    example_as_run(model, f"npy:{data_path}", example_run)
    rows["example"] = {"recipe": f"pytorch/examples vae/main.py ({x_train.shape[1]}-400-20, Adam 1e-3, batch 128, "
                                 f"DataLoader), {example_epochs} epochs",
                       "command": f"benchmarks.train_recipes.run_example(epochs={example_epochs})",
                       "train_seconds": seconds, "epochs": example_epochs}
    exports.start("example", example_run)

    budget = round(seconds, 2)
    rows["defaults"] = fit_run("defaults", data_path, work / "defaults", ["--time-budget-s", str(budget)], cpu)
    rows["defaults"]["recipe"] = f"training.fit defaults, --time-budget-s {budget} (the example's time)"
    rows["defaults"]["budget_error"] = rows["defaults"]["train_seconds"] / budget - 1
    exports.start("defaults", work / "defaults")

    previous = "training.fit defaults before issue 18 (256-128, latent 8, Adam 3e-3 constant, batch 64)"
    rows["previous_defaults"] = fit_run("previous defaults", data_path, work / "previous",
                                        [*PREVIOUS_DEFAULTS, "--time-budget-s", str(budget)], cpu)
    rows["previous_defaults"]["recipe"] = f"{previous}, --time-budget-s {budget}"
    exports.start("previous_defaults", work / "previous")
    if name == "digits":  # a few seconds: the former defaults' own 60 epochs too
        rows["previous_defaults_60"] = fit_run("previous defaults, 60 epochs", data_path, work / "previous60",
                                               [*PREVIOUS_DEFAULTS, "--epochs", str(example_epochs)], cpu)
        rows["previous_defaults_60"]["recipe"] = f"{previous}, {example_epochs} epochs"
        exports.start("previous_defaults_60", work / "previous60")
    for key, row in rows.items():
        row.update(exports.scored(key, x_test))
    return {"train_examples": len(x_train), "test_examples": len(x_test), "example_shape": list(x_train.shape[1:]),
            "rows": rows, "budget_s": budget}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "digits"], choices=["mnist", "digits"],
                   help="datasets to run")
    p.add_argument("--example-epochs", type=int, default=60, help="epochs of the example recipe")
    two = (os.cpu_count() or 1) >= 2
    p.add_argument("--cpu", type=int, default=1 if two else None,
                   help="CPU to pin every training run to (none: no pinning)")
    p.add_argument("--export-cpu", type=int, default=0 if two else None,
                   help="CPU for the exports, which run in the background beside the next training run")
    p.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = p.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # the example recipe runs in this process
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "issue 18: pytorch/examples VAE vs training.fit defaults, same data and wall-clock",
        "command": "python -m benchmarks.train_recipes " + " ".join(sys.argv[1:]),
        "scorer": f"ONNX Runtime on the exported model; grey pixels / 255 as Bernoulli targets; -ELBO averaged "
                  f"over {ELBO_SAMPLES} z samples; IWAE bound k={IWAE_K}; active: Var_x E[z] > {ACTIVE_THRESHOLD}",
        "pinned_cpu": args.cpu, "torch_threads": 1, "loadavg_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "datasets": {}}
    for name in args.datasets:
        result["datasets"][name] = bench_dataset(name, args.example_epochs, args.cpu, args.export_cpu)
    result["total_s"] = time.perf_counter() - t0
    result["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, ds in result["datasets"].items():
        print(f"\n{name} ({ds['train_examples']} train / {ds['test_examples']} test)")
        print(f"{'recipe':<20}{'wall-clock s':>14}{'epochs':>8}{'test -ELBO':>12}{'IWAE NLL':>10}{'active':>9}")
        for key, r in ds["rows"].items():
            print(f"{key:<20}{r['train_seconds']:>14.1f}{r['epochs']:>8}{r['test_neg_elbo']:>12.2f}"
                  f"{r['iwae_nll']:>10.2f}{r['active_units']:>5}/{r['latent_dim']}")
    print(f"\ntotal {result['total_s']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
