"""Evaluating support-set attacks on meta-test tasks: CA, BA, ASR (Kato et al., eqs. 10–12).

Per task the trigger is one query chosen uniformly at random and Y'_adv a label chosen uniformly
among the labels other than the trigger's true label (both by seed). Then
- CA: query accuracy after fine-tuning on the clean support set,
- BA: query accuracy after fine-tuning on the poisoned support set, over the queries OTHER than
  the trigger (the trigger's outcome is what ASR measures),
- ASR: 1 if the trigger is classified Y'_adv after fine-tuning on the poisoned support set,
each averaged over tasks with a 95% confidence interval. Queries are classified as one batch
per task, as in the MAML reference.

Where the victim classifies the trigger is the `protocol` (the CNN's BatchNorm uses batch
statistics, so a prediction depends on its batch):
- "transductive": the trigger is one of the queries, classified inside the query batch;
- "paper": the trigger is classified by itself, F(X'_tr, g(D̃_S, θ*)) of eq. 12 as written (a
  batch of one, what MAML code does when it calls the adapted model on the trigger image). This
  reproduces the published table, but a lone image is normalised with its own statistics and the
  clean model classifies it near chance (Omniglot 5w5s: 28% correct, 20% chance), so part of
  that ASR is the lone-image regime rather than the attack; `clean_trigger_accuracy` shows it.

Why BA leaves the trigger out: with 25 queries per task (5-way, 5 per class) a successful
trigger alone costs 4 points, so a BA counting it could not exceed ≈ 95.5% at the published
CA 99.46% / ASR 98.2% (ε = 0.07), yet the published BA there is 97.92%. The BA over all queries
is reported beside it (`backdoor_accuracy_all_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from poisonlab.attacks.adversarial_support import AdversarialSupportPoisoning
from poisonlab.attacks.support_backdoor import SupportBackdoor
from poisonlab.data.episodes import Episodes
from poisonlab.errors import ConfigError
from poisonlab.training.maml import Params, TaskForward, finetune, finetune_and_predict


@dataclass
class TriggerChoice:
    """index [T]: the trigger's position among each task's queries; target [T]: Y'_adv."""

    index: Tensor
    target: Tensor


def choose_triggers(query_y: Tensor, ways: int, seed: int) -> TriggerChoice:
    """A random query per task and a random label other than its own (reproducible by seed)."""
    g = torch.Generator().manual_seed(seed)
    tasks, queries = query_y.shape
    index = torch.randint(0, queries, (tasks,), generator=g)
    true = query_y.cpu().gather(1, index[:, None]).squeeze(1)
    shift = torch.randint(1, ways, (tasks,), generator=g)
    return TriggerChoice(index=index, target=(true + shift) % ways)


@dataclass
class TaskOutcome:
    """Per task [T]: accuracy over all queries, over the queries other than the trigger, whether
    the trigger was classified as the attacker's label, and whether as its true label."""

    accuracy: Tensor
    accuracy_without_trigger: Tensor
    trigger_hits_target: Tensor
    trigger_correct: Tensor


Protocol = Literal["transductive", "paper"]
PROTOCOLS = get_args(Protocol)


def task_outcomes(logits: Tensor, query_y: Tensor, trigger: TriggerChoice,
                  trigger_logits: Tensor | None = None) -> TaskOutcome:
    """Per-task outcomes from query logits [T, Q, classes].

    The trigger's prediction comes from its row of `logits` (classified inside the query batch),
    or from `trigger_logits` [T, classes] when it was classified by itself.
    """
    pred = logits.argmax(-1)
    correct = (pred == query_y).float()
    index = trigger.index.to(pred.device)[:, None]
    others = torch.ones_like(correct).scatter_(1, index, 0.0)
    trig_pred = pred.gather(1, index).squeeze(1) if trigger_logits is None else trigger_logits.argmax(-1)
    trig_true = query_y.gather(1, index).squeeze(1)
    return TaskOutcome(correct.mean(1).cpu(), ((correct * others).sum(1) / others.sum(1)).cpu(),
                       (trig_pred == trigger.target.to(pred.device)).float().cpu(),
                       (trig_pred == trig_true).float().cpu())


def victim_outcomes(forward: TaskForward, theta: Params, support_x: Tensor, support_y: Tensor,
                    episodes: Episodes, trigger: TriggerChoice, finetune_steps: int,
                    finetune_lr: float, protocol: Protocol = "transductive") -> TaskOutcome:
    """The victim fine-tunes on (support_x, support_y), classifies its query batch and, under the
    "paper" protocol, the trigger by itself."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol='{protocol}' must be one of {', '.join(PROTOCOLS)}")
    adapted = finetune(forward, theta, support_x, support_y, finetune_steps, finetune_lr)
    qx = episodes.query_x
    with torch.no_grad():
        logits = forward(adapted, qx)
        trigger_logits = None
        if protocol == "paper":
            trigger_logits = forward(adapted, trigger_images(qx, trigger))[:, 0]
    return task_outcomes(logits, episodes.query_y, trigger, trigger_logits)


def trigger_images(query_x: Tensor, trigger: TriggerChoice) -> Tensor:
    """Each task's trigger query [T, 1, C, H, W]."""
    return query_x[torch.arange(query_x.shape[0]), trigger.index.to(query_x.device)].unsqueeze(1)


@dataclass
class EpsilonOutcome:
    """Per-task results of one ε: BA (without and with the trigger) and ASR indicators of the
    backdoor, ASP's accuracy, and the PGD loss curves [L, T]; plus the poisoned supports of the
    first tasks, for figures."""

    backdoor_accuracy: Tensor
    backdoor_accuracy_all_queries: Tensor
    attack_success: Tensor
    asp_accuracy: Tensor | None
    backdoor_losses: Tensor
    asp_losses: Tensor | None
    examples: Tensor


def attack_tasks(
    forward: TaskForward, theta: Params, episodes: Episodes, trigger: TriggerChoice,
    backdoor: SupportBackdoor, asp: AdversarialSupportPoisoning | None, finetune_steps: int,
    finetune_lr: float, seed: int, examples: int = 4, protocol: Protocol = "transductive",
) -> EpsilonOutcome:
    """Run the backdoor (and ASP) on a chunk of tasks and measure the victim's outcomes."""
    g = torch.Generator().manual_seed(seed)
    sx, sy, qx, qy = episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y
    bd = backdoor.poison(sx, sy, trigger_images(qx, trigger), trigger.target.to(sx.device),
                         generator=g)
    out = victim_outcomes(forward, theta, bd.support_x, sy, episodes, trigger, finetune_steps,
                          finetune_lr, protocol)
    asp_acc = asp_losses = None
    if asp is not None:
        res = asp.poison(sx, sy, qx, qy, generator=g)
        asp_logits = finetune_and_predict(forward, theta, res.support_x, sy, qx, finetune_steps, finetune_lr)
        asp_acc, asp_losses = task_outcomes(asp_logits, qy, trigger).accuracy, res.losses.cpu()
    return EpsilonOutcome(out.accuracy_without_trigger, out.accuracy, out.trigger_hits_target,
                          asp_acc, bd.losses.cpu(), asp_losses,
                          bd.support_x[:examples].detach().cpu())
