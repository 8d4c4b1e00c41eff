"""CNN4: the 4-layer convolutional network of few-shot learning (Vinyals et al. 2016, Finn et al. 2017).

4 × [conv 3×3, `hidden` filters, stride 2, padding 1 → BatchNorm with batch statistics (no running
statistics) → ReLU] (28 → 14 → 7 → 4 → 2), mean over H and W, linear head. Initialisation follows
the MAML Omniglot reference (learn2learn): Xavier-uniform convolutions with zero bias, BatchNorm
scale U(0, 1) and zero shift, head weights N(0, 1) and zero bias.

Two forms share one parameter layout:
- `CNN4`, an ordinary `nn.Module` for users and for single tasks;
- `cnn4_forward_tasks(params, x)`, a functional forward over a *batch of tasks*, each task with its
  own weights (leading dimension B on every parameter). The tasks run as one grouped convolution
  (tasks stacked as channel groups) and BatchNorm statistics stay per task and per channel. How
  many tasks to put in one call is a speed question answered in `poisonlab.training.maml`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poisonlab.models.registry import register_model

LAYERS = 4
BN_EPS = 1e-3  # as in the reference few-shot code


class CNN4(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        blocks = []
        for i in range(LAYERS):
            conv = nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, stride=2, padding=1)
            bn = nn.BatchNorm2d(hidden, eps=BN_EPS, track_running_stats=False)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            nn.init.uniform_(bn.weight)
            nn.init.zeros_(bn.bias)
            blocks += [conv, bn, nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden, num_classes)
        nn.init.normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model("cnn4")
def build_cnn4(num_classes: int, in_channels: int = 1, hidden: int = 64) -> CNN4:
    return CNN4(num_classes, in_channels, hidden)


def cnn4_forward_tasks(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits [B, n, classes] for inputs x [B, n, C, H, W] under per-task parameters.

    `params` holds the `CNN4.state_dict()` names, each with a leading task dimension B
    (e.g. `body.0.weight` of shape [B, hidden, C, 3, 3]).
    """
    b, n, c, h, w = x.shape
    # Tasks become channel groups: [n, B*C, H, W].
    out = x.transpose(0, 1).reshape(n, b * c, h, w)
    for i in range(LAYERS):
        weight = params[f"body.{3 * i}.weight"]
        bias = params[f"body.{3 * i}.bias"]
        hidden = weight.shape[1]
        out = F.conv2d(
            out, weight.reshape(b * hidden, *weight.shape[2:]), bias.reshape(-1),
            stride=2, padding=1, groups=b,
        )
        # Per-channel statistics over (n, H, W) = per task and channel: BatchNorm in training mode.
        out = F.batch_norm(
            out, None, None, params[f"body.{3 * i + 1}.weight"].reshape(-1),
            params[f"body.{3 * i + 1}.bias"].reshape(-1), training=True, eps=BN_EPS,
        )
        out = F.relu(out)
    feats = out.mean(dim=(2, 3)).reshape(n, b, -1).transpose(0, 1)  # [B, n, hidden]
    return torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))


def _patches(out: Tensor, tasks: int, channels: int) -> tuple[Tensor, int, int]:
    """The 3×3, stride-2, padding-1 patches of out [n, B·C, H, W] as [n, B, C·9, H'·W'] (im2col by
    nine strided slices of the padded input, which a compiler fuses; F.unfold it does not)."""
    n, _, h, w = out.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    padded = F.pad(out, (1, 2 * wo - w, 1, 2 * ho - h))
    cols = torch.stack([padded[..., i:i + 2 * ho:2, j:j + 2 * wo:2]
                        for i in range(3) for j in range(3)], dim=2)  # [n, B·C, 9, H', W']
    return cols.reshape(n, tasks, channels * 9, ho * wo), ho, wo


def cnn4_forward_tasks_matmul(params: dict[str, Tensor], x: Tensor,
                              bn: str = "batch_norm") -> Tensor:
    """`cnn4_forward_tasks` with every convolution as patches × weights (one batched matrix
    product per layer), the form `poisonlab.training.compiled_maml` compiles. Same layout, same
    numbers up to float rounding (equal in float64).

    bn: "batch_norm" (F.batch_norm, whose decomposition keeps its own backward) or "var_mean"
    (the batch statistics by torch.var_mean, then one scale and one shift: the form the
    compiler fuses; same numbers in float64)."""
    if bn not in ("batch_norm", "var_mean"):
        raise ValueError(f"bn must be 'batch_norm' or 'var_mean', not {bn!r}")
    b, n, c, h, w = x.shape
    out = x.transpose(0, 1).reshape(n, b * c, h, w)
    for i in range(LAYERS):
        weight = params[f"body.{3 * i}.weight"]
        hidden, c = weight.shape[1], weight.shape[2]
        cols, ho, wo = _patches(out, b, c)
        z = torch.einsum("bok,nbkl->nbol", weight.reshape(b, hidden, c * 9), cols)
        z = z + params[f"body.{3 * i}.bias"][None, :, :, None]
        gamma, beta = params[f"body.{3 * i + 1}.weight"], params[f"body.{3 * i + 1}.bias"]
        if bn == "var_mean":  # statistics per task and channel over (n, H'·W')
            var, mean = torch.var_mean(z, dim=(0, 3), keepdim=True, correction=0)
            scale = gamma[None, :, :, None] * torch.rsqrt(var + BN_EPS)
            z = z * scale + (beta[None, :, :, None] - mean * scale)
        else:
            z = F.batch_norm(z.reshape(n, b * hidden, ho * wo), None, None, gamma.reshape(-1),
                             beta.reshape(-1), training=True, eps=BN_EPS)
        out = F.relu(z).reshape(n, b * hidden, ho, wo)
    feats = out.mean(dim=(2, 3)).reshape(n, b, -1).transpose(0, 1)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))
