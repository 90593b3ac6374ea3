"""The hand-written training step of the MLP VAE with a Bernoulli decoder: forward, ELBO and backward in
plain tensor ops, no autograd graph (`--backward manual`, what `--backward auto` picks where it applies).

Why: at batch 128 on one CPU core the eleven matrix products of a 784-400-20 step take about 4.9 ms, at
the core's peak, and autograd, the composite BCE-with-logits and the optimiser's Python added about 60% on
top (benchmarks/train_analysis.md). Here each product writes straight into its
parameter's `.grad` (allocated once), the ELBO's gradient is formed in a few fused element-wise ops,
and the optimiser's step is the same `torch.optim.Adam` (its fused kernel, called on the optimiser's own
state without the Python of `Optimizer.step`, which cost about 0.17 ms a step), so checkpoints and
`--resume` do not care which step made them.

The maths is the autograd path's (training.model.VAE.forward + training_objective), written out; a
unit test checks the gradients against autograd. With B examples, logits l (B, D), s = sigmoid(l):

    loss  = 1/B sum_b [ sum_i softplus(l_bi) - x_bi l_bi ]  +  beta * sum_j max(free_bits, KL_j)
    KL_j  = 1/B sum_b 1/2 (mu_bj^2 + var_bj - 1 - logvar_bj),  z = mu + sqrt(var) * eps
    dl    = (s - x) / B = -(sigmoid(-l) + x - 1) / B          (B, D)
    dmu   = dz + w_j mu,  dlogvar = 1/2 (dz * eps * sqrt(var) + w_j (var - 1)),  w_j = beta / B
            (0 for a latent dimension held at its free-bits floor)

and every Linear's gradients are dW = g^T h, db = sum_b g, dh = (g W) * [h > 0] through a ReLU.
"""

from __future__ import annotations

import math

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


# BLAS_NOTE: under `--matmul-precision medium` (torch.set_float32_matmul_precision) torch.dot and torch.mv also
# go through oneDNN and took 170 and 47 us on this model's (128, 784) batch against 19 us for mul + sum and 9 us
# for sum + mul_ (which are not matrix products and do not change with the precision); so neither is used.


def _linears(body: nn.Module) -> list[nn.Linear]:
    layers = list(body.children())
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    # _mlp builds Linear, ReLU, ..., Linear: a ReLU after every Linear but the last
    assert all(isinstance(m, nn.ReLU) for m in layers[1::2]) and len(layers) == 2 * len(linears) - 1
    return linears


def _plain_fused_adam(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt.step()` is exactly one `torch._fused_adam_` call over one parameter group."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    g = opt.param_groups[0]
    return (bool(g.get("fused")) and not g["amsgrad"] and not g["maximize"] and not g["capturable"]
            and not g["differentiable"] and not g.get("decoupled_weight_decay", False)
            and not isinstance(g["lr"], Tensor) and not opt._optimizer_step_pre_hooks
            and not opt._optimizer_step_post_hooks)


class MlpElboStep:
    """One optimiser step on a batch: `step(x, eps, kl_weight)` returns the float32 sums (2,) of log P(x|z)
    and KL over the batch (the metrics the autograd path accumulates), after `opt.step()`.

    Keeps references to the parameters, whose `.grad` tensors it owns from here on (overwritten each step,
    never zeroed: every element is written). An instance serves one epoch (train_one_epoch makes one): once
    Adam's state exists it keeps the lists of state tensors, so anything that replaces them
    (`opt.load_state_dict`) needs a new instance.
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
        self.params: list[Tensor] = list(vae.parameters())
        self.direct_adam = _plain_fused_adam(opt)
        self._adam_lists: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None
        # transposed views of the weights for the forward products (views: Adam's in-place updates show)
        self.enc_wt = [lin.weight.t() for lin in self.enc]
        self.dec_wt = [lin.weight.t() for lin in self.dec]

    @torch.no_grad()
    def step(self, x: Tensor, eps: Tensor, kl_weight: float, out: Tensor | None = None) -> Tensor:
        """x (B, *shape) in [0, 1]; eps (B, d) ~ N(0, I). Gradients, clipping, the optimiser's step. The sums
        are written into `out` (2,) when given."""
        sums = self.gradients(x, eps, kl_weight, out)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self._optimizer_step()
        return sums

    def _optimizer_step(self) -> None:
        """`opt.step()`; for a plain fused Adam whose state exists, its kernel directly (what `step` calls)."""
        if self._adam_lists is None:
            found = [self.opt.state.get(p) for p in self.params] if self.direct_adam else []
            states: list[dict[str, Tensor]] = [st for st in found if st]
            if not states or len(states) != len(self.params):
                self.opt.step()  # the first step creates Adam's state
                return
            # nothing but this step touches the optimiser within an epoch: the lists hold for the epoch
            grads = [p.grad for p in self.params if p.grad is not None]
            self._adam_lists = (grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                                [st["step"] for st in states])
        grads, exp_avgs, exp_avg_sqs, steps = self._adam_lists
        group = self.opt.param_groups[0]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(self.params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                           beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                           eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    @torch.no_grad()
    def gradients(self, x: Tensor, eps: Tensor, kl_weight: float, out: Tensor | None = None) -> Tensor:
        """Every parameter's `.grad` for the batch; returns the sums (2,) of log P(x|z) and KL (in `out` if
        given)."""
        b, d = x.shape[0], self.d
        inv = 1.0 / b
        x = x.reshape(b, -1)  # (B, D)
        # forward: acts[i] is the input of Linear i (post-ReLU), kept for its weight gradient
        enc_in: list[Tensor] = []
        h = x
        for i, (lin, wt) in enumerate(zip(self.enc, self.enc_wt, strict=True)):
            enc_in.append(h)
            h = torch.addmm(lin.bias, h, wt)
            if i < len(self.enc) - 1:
                h.relu_()
        mu, logvar = h[:, :d], h[:, d:]  # (B, d) each
        std = torch.exp(logvar * 0.5)
        z = torch.addcmul(mu, std, eps)  # (B, d)
        dec_in: list[Tensor] = []
        h = z
        for i, (lin, wt) in enumerate(zip(self.dec, self.dec_wt, strict=True)):
            dec_in.append(h)
            last = i == len(self.dec) - 1
            # the last layer gives -logits (beta = alpha = -1): sigmoid(-l) = 1 - s then needs no negation
            h = torch.addmm(lin.bias, h, wt, beta=-1 if last else 1, alpha=-1 if last else 1)
            if not last:
                h.relu_()
        neg_logits = h  # (B, D)

        # sum_b log P(x|z) = sum x*l - softplus(l), and -softplus(l) = log sigmoid(-l): one sigmoid serves the
        # metric and the gradient (softplus costs 3x a sigmoid here). sigmoid(-l) is 0 only past l = 88,
        # where log gives -inf: then logsigmoid itself.
        sig_neg = torch.sigmoid(neg_logits)  # (B, D) 1 - s
        log_sig_sum = torch.log(sig_neg).sum()
        if not math.isfinite(float(log_sig_sum)):
            log_sig_sum = F.logsigmoid(neg_logits).sum()
        log_lik = torch.sub(log_sig_sum, torch.mul(x, neg_logits).sum())  # not torch.dot: see BLAS_NOTE
        var_m1 = torch.expm1(logvar)  # (B, d) var - 1
        kl_dims = torch.addcmul(var_m1 - logvar, mu, mu).sum(0).mul_(0.5)  # (d,) summed over the batch
        sums = torch.stack([log_lik, kl_dims.sum()], out=out)

        # backward of the reconstruction term: d loss / d logits = (s - x) / B = -(sig_neg + x - 1) / B,
        # the factor -1/B applied inside the products
        g = sig_neg.add_(x).sub_(1.0)  # (B, D)
        g = self._linear_backward(self.dec, dec_in, g, -inv, need_input_grad=True)  # (B, d) d loss / dz
        # backward of the KL term and the reparameterisation: dmu = dz + w mu, dlogvar = (dz eps std + w (var - 1)) / 2
        w: float | Tensor = kl_weight * inv
        if self.free_bits > 0:  # a dimension held at its floor contributes a constant: no gradient
            w = (kl_dims * inv >= self.free_bits).to(x.dtype).mul_(w)  # (d,)
        dmu = torch.addcmul(g, mu, w) if isinstance(w, Tensor) else torch.add(g, mu, alpha=w)
        dlv = torch.addcmul(var_m1.mul_(w).mul_(0.5) if isinstance(w, Tensor) else var_m1.mul_(0.5 * w),
                            g * eps, std, value=0.5)
        d_enc = torch.cat([dmu, dlv], 1)  # (B, 2d)
        self._linear_backward(self.enc, enc_in, d_enc, 1.0, need_input_grad=False)
        return sums

    def _linear_backward(self, linears: list[nn.Linear], inputs: list[Tensor], g: Tensor, scale: float,
                         need_input_grad: bool) -> Tensor:
        """Gradients of a Linear-ReLU chain into each `.grad`, from `scale * g` = d loss / d output (B, out);
        returns d loss / d input when asked (else the last g). The scale rides along unapplied (the chain is
        linear in g) and enters each weight gradient inside its product."""
        for i in range(len(linears) - 1, -1, -1):
            lin, h = linears[i], inputs[i]
            assert lin.weight.grad is not None and lin.bias.grad is not None
            torch.addmm(lin.weight.grad, g.t(), h, beta=0, alpha=scale, out=lin.weight.grad)
            torch.sum(g, 0, out=lin.bias.grad)  # not a matrix-vector product: see BLAS_NOTE
            if scale != 1.0:
                lin.bias.grad.mul_(scale)
            if i > 0:
                g = torch.ops.aten.threshold_backward(torch.mm(g, lin.weight), h, 0)  # (B, in) through the ReLU
            elif need_input_grad:
                g = torch.addmm(h, g, lin.weight, beta=0, alpha=scale)  # (B, in); h only gives the shape
        return g
