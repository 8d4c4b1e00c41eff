"""Evaluating support-set attacks on meta-test tasks: CA, BA, ASR (Kato et al., eqs. 10–12).

Per task the trigger is one query chosen uniformly at random and Y'_adv a label chosen uniformly
among the labels other than the trigger's true label (both by seed). Then
- CA: query accuracy after fine-tuning on the clean support set,
- BA: query accuracy after fine-tuning on the poisoned support set, over the queries OTHER than
  the trigger (the trigger's outcome is what ASR measures),
- ASR: 1 if the trigger is classified Y'_adv after fine-tuning on the poisoned support set,
each averaged over tasks with a 95% confidence interval. Queries are classified as one batch
per task, as in the MAML reference. The victim fine-tunes θ* on the (clean or poisoned) support
set with the recipe the attacker assumes (`finetune_steps`, `finetune_lr` of the attack).

Where the victim classifies the trigger is the `protocol` (the CNN's BatchNorm uses batch
statistics, so a prediction depends on its batch):
- "transductive": the trigger is one of the queries, classified inside the query batch;
- "paper": the trigger is classified by itself, F(X'_tr, g(D̃_S, θ*)) of eq. 12 as written (a
  batch of one, what MAML code does when it calls the adapted model on the trigger image). This
  reproduces the published table, but a lone image is normalised with its own statistics and the
  clean model classifies it far less accurately than inside a batch, so part of that ASR is the
  lone-image regime rather than the attack; `clean_trigger_accuracy` shows it.

Why BA leaves the trigger out: with 25 queries per task (5-way, 5 per class) a successful
trigger alone costs 4 points, so a BA counting it could not exceed ≈ 95.5% at the published
CA 99.46% / ASR 98.2% (ε = 0.07), yet the published BA there is 97.92%. The BA over all queries
is reported beside it (`backdoor_accuracy_all_queries`).

`evaluate_attacks` runs the whole protocol (tasks in chunks of `task_batch`, each chunk clean and
at each ε an independent piece on an executor, by default one thread per core on a CPU) and
returns a `FewShotResult`; `FewShotResult.metrics()` is the run's metrics.json part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field, field_validator
from torch import Tensor

from poisonlab.attacks.adversarial_support import AdversarialSupportPoisoning
from poisonlab.attacks.support_backdoor import SupportBackdoor, SupportBackdoorConfig, TriggerBatch
from poisonlab.attacks.support_pgd import Epsilon, SupportAttackConfig
from poisonlab.config import Distinct, replace
from poisonlab.data.episodes import Episodes, EpisodeSampler
from poisonlab.data.types import FewShotData
from poisonlab.errors import ConfigError
from poisonlab.evaluation.fewshot_results import EpsilonRow, EpsilonTrace, FewShotResult
from poisonlab.evaluation.pieces import ThreadExecutor, run_pieces
from poisonlab.executors import Executor
from poisonlab.metrics import mean_ci95
from poisonlab.progress import progress_bar
from poisonlab.runs import Run
from poisonlab.training.maml import (
    Params,
    TaskForward,
    default_workers,
    finetune,
    finetune_and_predict,
)
from poisonlab.training.meta_trainer import MetaTrainConfig

Protocol = Literal["transductive", "paper"]
PROTOCOLS = get_args(Protocol)


class FewShotEvalConfig(SupportBackdoorConfig):
    """The evaluation's settings: the attacker's (inherited from `SupportBackdoor.Config`, the
    same for every ε; ASP uses the shared part) and the protocol's.

    epsilon: the headline budget: the swept ε closest to it gives the run's headline numbers
        (the attacks themselves run at every ε of `epsilons`).
    trigger_batch: the attacker's stand-in batch for the trigger; None = the protocol's
        ("clean_support" under "transductive", "alone" under "paper").
    iterations: PGD steps, here at least 1 (the summary reports the final PGD loss).
    epsilons: the budgets ε the attacks run at, in this order (Kato et al.'s sweep).
    protocol: where the victim classifies the trigger ("transductive" or "paper", see above).
    tasks: meta-test tasks T; the same tasks and triggers for every ε.
    task_batch: tasks per chunk (chunks run on one thread per core on a CPU).
    asp: run the ASP baseline beside the backdoor.
    asp_epsilons: the ε values ASP runs at; None = all of `epsilons`.
    """

    trigger_batch: TriggerBatch | None = None  # type: ignore[assignment]
    epsilons: Annotated[list[Epsilon], Distinct] = Field(
        default_factory=lambda: [0.01, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3, 0.5], min_length=1)
    protocol: Protocol = "transductive"
    tasks: int = Field(2000, ge=1)
    task_batch: int = Field(4, ge=1)
    asp: bool = True
    asp_epsilons: Annotated[list[Epsilon], Distinct] | None = None

    @field_validator("iterations")
    @classmethod
    def _final_loss_needs_a_step(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1: the evaluation reports the final PGD loss")
        return value

    def attacker_trigger_batch(self) -> TriggerBatch:
        """The attacker's stand-in batch for the trigger: as configured, else the protocol's."""
        if self.trigger_batch is not None:
            return self.trigger_batch
        return "alone" if self.protocol == "paper" else "clean_support"

    def backdoor_config(self, epsilon: float) -> SupportBackdoorConfig:
        """The backdoor's settings at budget `epsilon`."""
        names = set(SupportBackdoorConfig.model_fields)
        base = SupportBackdoorConfig(**self.model_dump(include=names)
                                     | {"trigger_batch": self.attacker_trigger_batch()})
        return replace(base, epsilon=epsilon)

    def asp_config(self, epsilon: float) -> SupportAttackConfig | None:
        """ASP's settings at budget `epsilon`, or None where ASP does not run."""
        if not self.asp or (self.asp_epsilons is not None and epsilon not in self.asp_epsilons):
            return None
        base = SupportAttackConfig(**self.model_dump(include=set(SupportAttackConfig.model_fields)))
        return replace(base, epsilon=epsilon)


@dataclass
class TriggerChoice:
    """index [T]: the trigger's position among each task's queries; target [T]: Y'_adv."""

    index: Tensor
    target: Tensor

    def part(self, sl: slice) -> TriggerChoice:
        """The triggers of the tasks in `sl`."""
        return TriggerChoice(self.index[sl], self.target[sl])


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


def evaluate_attacks(
    forward: TaskForward, theta: Params, test: FewShotData, meta: MetaTrainConfig,
    cfg: FewShotEvalConfig, *, seed: int = 0, device: torch.device | str = "cpu",
    progress: bool = True, run: Run | None = None, executor: Executor | None = None,
) -> FewShotResult:
    """CA on `cfg.tasks` clean meta-test tasks (`meta.ways`-way `meta.shots`-shot), then the
    backdoor (and ASP) at every ε of `cfg.epsilons` on the same tasks and triggers.

    The pieces (`chunk_piece`): per chunk of `cfg.task_batch` tasks, the clean victims, and the
    attacks at each ε; each seeds itself from its chunk and ε. With a `run`, every piece's
    outcome is kept in it as it arrives (`fewshot-<key>`) and a resumed run reuses them. With no
    `executor` the chunks run on one thread per core on a CPU, as before pieces existed.
    """
    sampler = EpisodeSampler(test, meta.ways, meta.shots, meta.queries, rotate=False, seed=seed)
    episodes = sampler.sample_fixed(cfg.tasks, seed=seed + 2)
    triggers = choose_triggers(episodes.query_y, meta.ways, seed=seed + 3)
    starts = range(0, cfg.tasks, cfg.task_batch)
    items: dict[str, tuple[int, int | None]] = {}
    for start in starts:
        items[f"clean-c{start}"] = (start, None)
        items |= {f"attack-c{start}-e{e}": (start, e) for e in range(len(cfg.epsilons))}
    if executor is None:
        executor = ThreadExecutor(default_workers(device) if len(starts) > 1 else 1)
    shared = {"forward": forward, "theta": theta, "episodes": episodes, "triggers": triggers,
              "cfg": cfg, "seed": seed, "device": str(device)}
    with progress_bar(len(items), "attacking", enabled=progress) as bar:
        results = run_pieces(executor, chunk_piece, items, shared=shared,
                             load=lambda key: _load_piece(run, key),
                             save=None if run is None else lambda key, r: _save_piece(run, key, r),
                             done=lambda key, r: bar.advance())  # the bar above
    clean = [results[f"clean-c{start}"] for start in starts]
    outcomes = {eps: [results[f"attack-c{start}-e{e}"] for start in starts]
                for e, eps in enumerate(cfg.epsilons)}
    return summarize(cfg, clean, outcomes, episodes.support_x[:4])


def chunk_piece(item: tuple[int, int | None], *, forward: TaskForward, theta: Params,
                episodes: Episodes, triggers: TriggerChoice, cfg: FewShotEvalConfig, seed: int,
                device: str) -> TaskOutcome | EpsilonOutcome:
    """One piece: the tasks from `start` (a chunk of `cfg.task_batch`), clean (e None) or
    attacked at ε number e (seeded by seed, start and e alone)."""
    start, e = item
    part = _chunk(episodes, start, cfg.task_batch, device)
    trig = triggers.part(slice(start, start + cfg.task_batch))
    if e is None:
        return victim_outcomes(forward, theta, part.support_x, part.support_y, part, trig,
                               cfg.finetune_steps, cfg.finetune_lr, cfg.protocol)
    backdoor, asp = attackers(forward, theta, cfg, cfg.epsilons[e])
    return attack_tasks(forward, theta, part, trig, backdoor, asp, cfg.finetune_steps,
                        cfg.finetune_lr, seed=seed * 1000003 + start * 101 + e,
                        protocol=cfg.protocol)


def _save_piece(run: Run, key: str, outcome: TaskOutcome | EpsilonOutcome) -> None:
    run.save_state(f"fewshot-{key}", asdict(outcome))


def _load_piece(run: Run | None, key: str) -> TaskOutcome | EpsilonOutcome | None:
    state = None if run is None else run.load_state(f"fewshot-{key}")
    if state is None:
        return None
    return (TaskOutcome if key.startswith("clean-") else EpsilonOutcome)(**state)


def attackers(forward: TaskForward, theta: Params, cfg: FewShotEvalConfig, epsilon: float,
              ) -> tuple[SupportBackdoor, AdversarialSupportPoisoning | None]:
    """The backdoor and (where it runs) ASP at budget `epsilon`."""
    backdoor = SupportBackdoor(forward, theta, config=cfg.backdoor_config(epsilon))
    asp_cfg = cfg.asp_config(epsilon)
    asp = None if asp_cfg is None else AdversarialSupportPoisoning(forward, theta, config=asp_cfg)
    return backdoor, asp


def _chunk(ep: Episodes, start: int, size: int, device: torch.device | str) -> Episodes:
    sl = slice(start, start + size)
    return Episodes(ep.support_x[sl], ep.support_y[sl], ep.query_x[sl], ep.query_y[sl],
                    ep.classes[sl]).to(device)


def summarize(cfg: FewShotEvalConfig, clean: list[TaskOutcome],
              outcomes: dict[float, list[EpsilonOutcome]],
              clean_examples: Tensor | None = None) -> FewShotResult:
    """CA, the clean trigger rates and one row per ε from the outcomes of every chunk."""
    ca, ca_ci = mean_ci95(torch.cat([c.accuracy for c in clean]))
    base, base_ci = mean_ci95(torch.cat([c.trigger_hits_target for c in clean]))
    trig_acc, trig_acc_ci = mean_ci95(torch.cat([c.trigger_correct for c in clean]))
    rows, traces = [], {}
    for eps, parts in outcomes.items():
        ba, ba_ci = mean_ci95(torch.cat([p.backdoor_accuracy for p in parts]))
        ba_all, ba_all_ci = mean_ci95(torch.cat([p.backdoor_accuracy_all_queries for p in parts]))
        asr, asr_ci = mean_ci95(torch.cat([p.attack_success for p in parts]))
        asp = asp_ci = None
        if parts[0].asp_accuracy is not None:
            asp, asp_ci = mean_ci95(torch.cat([p.asp_accuracy for p in parts]))
        loss = torch.cat([p.backdoor_losses for p in parts], dim=1)
        rows.append(EpsilonRow(eps, ba, ba_ci, ba_all, ba_all_ci, asr, asr_ci, asp, asp_ci,
                               float(loss[-1].mean())))
        traces[eps] = EpsilonTrace(loss, parts[0].examples)
    headline = min(rows, key=lambda r: abs(r.epsilon - cfg.epsilon))
    return FewShotResult(
        cfg.tasks, cfg.protocol, cfg.attacker_trigger_batch(), cfg.keep_support, ca, ca_ci,
        base, base_ci, trig_acc, trig_acc_ci, rows, headline, traces, clean_examples)
