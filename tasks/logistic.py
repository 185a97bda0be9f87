"""The default head: multinomial logistic regression on frozen features, solved with L-BFGS.

Shared by the train stage (the model) and the select stage (the k-fold probe of each candidate
backbone); stages never import each other, so it lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.config import TrainParams
from tasks.model import build_head


def fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, p: TrainParams,
              max_iter: int = 500) -> nn.Module:
    """Multinomial logistic regression on the standardised features, solved to convergence.

    Cross-entropy (mean over samples) + l2/2 * ||W||^2, full-batch L-BFGS from zero:
    deterministic, and the regularisation is explicit instead of an early-stopping accident
    (the linear-probe protocol of Kornblith et al. 2019).
    """
    head = build_head("linear", x.shape[1], num_classes, power=p.feature_power)
    head[0].fit(x)
    linear: nn.Linear = head[2]
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    with torch.no_grad():
        z = head[0](x)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(z), y, label_smoothing=p.label_smoothing)
        loss = loss + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.eval()


def scores(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = head(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
