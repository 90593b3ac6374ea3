"""The hand-written training step of the MLP VAE with a Bernoulli decoder: forward, ELBO and backward in
plain tensor ops, no autograd graph (`--backward manual`, what `--backward auto` picks where it applies).

Why: at batch 128 on one CPU core the five (128 x 784) x (784 x 400)-sized matrix products of a
784-400-20 step take about 4.7 ms, and autograd, the composite BCE-with-logits and the optimiser's
Python added as much again (benchmarks/train_loop.py). Here each product writes straight into its
parameter's `.grad` (allocated once), the ELBO's gradient is formed in a few fused element-wise ops,
and the optimiser's step is unchanged (the same `torch.optim.Adam`, so checkpoints and `--resume` do
not care which step made them).

The maths is the autograd path's (training.model.VAE.forward + training_objective), written out; a
unit test checks the gradients against autograd. With B examples, logits l (B, D), s = sigmoid(l):

    loss  = 1/B sum_b [ sum_i softplus(l_bi) - x_bi l_bi ]  +  beta * sum_j max(free_bits, KL_j)
    KL_j  = 1/B sum_b 1/2 (mu_bj^2 + var_bj - 1 - logvar_bj),  z = mu + sqrt(var) * eps
    dl    = (s - x) / B                                      (B, D)
    dmu   = dz + w_j mu,  dlogvar = 1/2 (dz * eps * sqrt(var) + w_j (var - 1)),  w_j = beta / B
            (0 for a latent dimension held at its free-bits floor)

and every Linear's gradients are dW = g^T h, db = sum_b g, dh = (g W) * [h > 0] through a ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.model import VAE


def supports(vae: VAE) -> str | None:
    """None when `MlpElboStep` can train `vae`, else why not."""
    if vae.config.arch != "mlp":
        return f"arch {vae.config.arch!r} (the manual step is written for 'mlp')"
    if vae.likelihood != "bernoulli":
        return f"likelihood {vae.likelihood!r} (the manual step is written for 'bernoulli')"
    if vae.config.objective != "elbo":
        return f"objective {vae.config.objective!r} (the manual step computes the ELBO)"
    return None


def _linears(body: nn.Module) -> list[nn.Linear]:
    layers = list(body.children())
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    # _mlp builds Linear, ReLU, ..., Linear: a ReLU after every Linear but the last
    assert all(isinstance(m, nn.ReLU) for m in layers[1::2]) and len(layers) == 2 * len(linears) - 1
    return linears


class MlpElboStep:
    """One optimiser step on a batch: `step(x, eps, kl_weight)` returns the float32 sums (2,) of log P(x|z)
    and KL over the batch (the metrics the autograd path accumulates), after `opt.step()`.

    Keeps references to the parameters, whose `.grad` tensors it owns from here on (overwritten each step,
    never zeroed: every element is written).
    """

    def __init__(self, vae: VAE, opt: torch.optim.Optimizer, free_bits: float, grad_clip: float) -> None:
        why = supports(vae)
        if why is not None:
            raise ValueError(f"backward 'manual': not available for {why}")
        self.vae, self.opt = vae, opt
        self.free_bits, self.grad_clip = free_bits, grad_clip
        self.enc, self.dec = _linears(vae.encoder_body), _linears(vae.decoder_body)
        self.d = vae.config.latent_dim
        for p in vae.parameters():
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.zeros_like(p)
        self.params = list(vae.parameters())

    @torch.no_grad()
    def step(self, x: Tensor, eps: Tensor, kl_weight: float) -> Tensor:
        """x (B, *shape) in [0, 1]; eps (B, d) ~ N(0, I). Gradients, clipping, the optimiser's step."""
        sums = self.gradients(x, eps, kl_weight)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return sums

    @torch.no_grad()
    def gradients(self, x: Tensor, eps: Tensor, kl_weight: float) -> Tensor:
        """Every parameter's `.grad` for the batch; returns the sums (2,) of log P(x|z) and KL."""
        b, d = x.shape[0], self.d
        inv = 1.0 / b
        x = x.reshape(b, -1)  # (B, D)
        # forward: acts[i] is the input of Linear i (post-ReLU), kept for its weight gradient
        enc_in: list[Tensor] = []
        h = x
        for i, lin in enumerate(self.enc):
            enc_in.append(h)
            h = torch.addmm(lin.bias, h, lin.weight.t())
            if i < len(self.enc) - 1:
                h.relu_()
        mu, logvar = h[:, :d], h[:, d:]  # (B, d) each
        std = torch.exp(logvar * 0.5)
        z = torch.addcmul(mu, std, eps)  # (B, d)
        dec_in: list[Tensor] = []
        h = z
        for i, lin in enumerate(self.dec):
            dec_in.append(h)
            h = torch.addmm(lin.bias, h, lin.weight.t())
            if i < len(self.dec) - 1:
                h.relu_()
        logits = h  # (B, D)

        # metrics: sum_b log P(x|z) = sum x*l - softplus(l); sum_b KL
        log_lik = torch.dot(x.reshape(-1), logits.reshape(-1)) - F.softplus(logits).sum()
        var = std * std
        kl_dims = torch.addcmul(var - logvar - 1.0, mu, mu).sum(0).mul_(0.5)  # (d,) summed over the batch
        sums = torch.stack([log_lik, kl_dims.sum()])

        # backward of the reconstruction term
        g = torch.sigmoid(logits).sub_(x).mul_(inv)  # (B, D) d loss / d logits
        g = self._linear_backward(self.dec, dec_in, g, need_input_grad=True)  # (B, d) d loss / dz
        # backward of the KL term and the reparameterisation
        w = kl_weight * inv
        d_enc = torch.empty((b, 2 * d), dtype=x.dtype, device=x.device)  # (B, 2d): (dmu, dlogvar)
        dlv = (g * eps).mul_(std)  # (B, d)
        if self.free_bits > 0:  # a dimension held at its floor contributes a constant: no gradient
            wj = (kl_dims * inv >= self.free_bits).to(x.dtype).mul_(w)  # (d,)
            torch.addcmul(g, mu, wj, out=d_enc[:, :d])
            dlv.addcmul_(var - 1.0, wj)
        else:
            torch.add(g, mu, alpha=w, out=d_enc[:, :d])
            dlv.add_(var, alpha=w).sub_(w)
        d_enc[:, d:] = dlv.mul_(0.5)
        self._linear_backward(self.enc, enc_in, d_enc, need_input_grad=False)
        return sums

    @staticmethod
    def _linear_backward(linears: list[nn.Linear], inputs: list[Tensor], g: Tensor,
                         need_input_grad: bool) -> Tensor:
        """Gradients of a Linear-ReLU chain into each `.grad`, from g = d loss / d output (B, out);
        returns d loss / d input when asked (else g of the first layer)."""
        for i in range(len(linears) - 1, -1, -1):
            lin, h = linears[i], inputs[i]
            assert lin.weight.grad is not None and lin.bias.grad is not None
            torch.mm(g.t(), h, out=lin.weight.grad)
            torch.sum(g, 0, out=lin.bias.grad)
            if i > 0:
                g = torch.ops.aten.threshold_backward(torch.mm(g, lin.weight), h, 0)  # through the ReLU
            elif need_input_grad:
                g = torch.mm(g, lin.weight)
        return g
