"""RecAdam (`method.recadam`): Adam pulled back towards the weights training started from."""

from __future__ import annotations

import math

import torch

from ..parts import Part, register


def anneal_lambda(t: float, k: float, t0: float) -> float:
    """lambda(t) = 1 / (1 + exp(-k (t - t0))), written so large |k (t - t0)| never overflows."""
    z = -k * (t - t0)
    return 1.0 / (1.0 + math.exp(z)) if z < 0 else math.exp(-z) / (1.0 + math.exp(-z))


class RecAdam(torch.optim.Optimizer):
    """RecAdam (Chen et al. 2020, "Recall and Learn"): Adam on the objective

        lambda(t) * L_LM + (1 - lambda(t)) * (coeff / 2) * sum (theta - theta0)^2,
        lambda(t) = 1 / (1 + exp(-anneal_k * (t - anneal_t0))),

    theta0 being the weights at the start of training. As in the authors' code, Adam's
    moments see only the LM gradient and its step is scaled by lambda(t) (Adam is
    invariant to the scale of the gradient), while the quadratic penalty's gradient
    coeff * (theta - theta0) is applied directly, decoupled like AdamW's weight decay.
    The pull lr * (1 - lambda) * coeff is capped at 1 (a step onto theta0): the authors'
    update overshoots and diverges beyond it, e.g. at lr 1e-3 with coeff 5000.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 anneal_k=0.5, anneal_t0=250, coeff=5000.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, anneal_k=anneal_k,
                        anneal_t0=anneal_t0, coeff=coeff)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["theta0"] = p.detach().clone()
                state["step"] += 1
                t = state["step"]
                lam = anneal_lambda(t, g["anneal_k"], g["anneal_t0"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(g["eps"])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / (1 - beta1 ** t) * lam)
                pull = min(1.0, g["lr"] * (1 - lam) * g["coeff"])
                p.add_(state["theta0"] - p, alpha=pull)
        return loss


PART = register(Part("recadam", optimizer=lambda entry, groups, lr: RecAdam(groups, lr=lr, **entry)))
