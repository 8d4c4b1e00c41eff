"""The targeted clean-label poisoning study: MetaPoison and gradient matching, victims from scratch.

Huang et al. 2020 (MetaPoison) and Geiping et al. 2021 (gradient matching, "Witches' Brew").
Protocol, as the MetaPoison reference's quick start: the training subset and the targets come
from poisonlab.evaluation.metapoison_data; the poisons are the same `budget` images of the poison
class for every attack and target. For every surrogate architecture and target:
- MetaPoison crafts δ and the colour grids on an ensemble of that architecture (public API
  `MetaPoison.craft`, its state saved into the run after every craft step);
- gradient matching crafts δ on one surrogate of that architecture trained on the clean subset
  with the victims' recipe;
- every victim architecture trains `trials` victims FROM SCRATCH on the poisoned set (trial k
  with seed + k); success = the unmodified target classified as the adversarial class.
The unperturbed baseline (craft step 0: the same poison images, no perturbation) is the clean
subset itself, so its victims (trial k, seed + k, the same for every target) are trained once
per architecture and classify every target: the same (target, trial) pairs as the attacks.
Poisons crafted on one surrogate architecture and evaluated on every victim architecture give the
transfer matrix. Victims are trained with training.supervised.train_classifier: every
architecture here has batch normalisation, which training.batched_models cannot batch.

Everything is kept in the run (poisons as safetensors Poisons files, each finished victim's
predictions and accuracy, the craft state and each victim's epoch state while they run), so a
resumed run continues crafting from the last saved step and skips finished victims.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields

import torch

from poisonlab.attacks.gradient_matching import GradientMatching
from poisonlab.attacks.metapoison import CraftState, MetaPoison
from poisonlab.attacks.poisons import Poisons
from poisonlab.data.types import ImageSet
from poisonlab.errors import ShapeError
from poisonlab.evaluation.metapoison_config import StudyConfig
from poisonlab.evaluation.metapoison_data import PoisonData, Target, targets
from poisonlab.evaluation.metapoison_results import (
    AttackResult,
    CraftRecord,
    Outcomes,
    StudyResult,
)
from poisonlab.models import build_model
from poisonlab.progress import progress_bar
from poisonlab.runs import Run
from poisonlab.training.supervised import (
    RunCheckpoint,
    predict_logits,
    train_classifier,
)
from poisonlab.training.supervised import (
    evaluate as clean_accuracy,
)

EXAMPLES = 6  # poisons shown beside their originals in the report


def factory(arch: str, data: PoisonData) -> Callable[[], torch.nn.Module]:
    """A builder of fresh `arch` networks for this data set."""
    channels = int(data.train.x.shape[1])
    return lambda: build_model(arch, data.num_classes, channels)


def check_feasible(cfg: StudyConfig, data: PoisonData) -> None:
    """Every architecture takes these images (one-line ShapeError) and every class exists."""
    targets(cfg.targets, data)
    for arch in dict.fromkeys([*cfg.surrogates, *cfg.victims.archs]):
        model = factory(arch, data)().eval()
        try:
            with torch.no_grad():
                model(data.train.x[:2])
        except RuntimeError as exc:
            raise ShapeError(f"images of size {list(data.train.x.shape[1:])} do not fit "
                             f"architecture {arch}: {str(exc).splitlines()[0]}") from None


class Study:
    """The study's state: data, poisons, targets; crafting and victims reused from the run."""

    def __init__(self, cfg: StudyConfig, run: Run, data: PoisonData, *, seed: int = 0,
                 progress: bool = True) -> None:
        self.cfg, self.run, self.data, self.seed, self.progress = cfg, run, data, seed, progress
        self.targets: list[Target] = targets(cfg.targets, data)
        self.adv = cfg.targets.adversarial
        chooser = MetaPoison(factory(cfg.surrogates[0], data), config=cfg.metapoison, seed=seed)
        self.poison_idx = chooser.choose_poisons(data.train, cfg.targets.poison_class)
        self.seconds: dict[str, float] = {}
        self.record = CraftRecord()

    # ---- victims ---------------------------------------------------------------------------
    def victim(self, name: str, arch: str, train: ImageSet, trial: int,
               x_targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Predicted classes of x_targets and the clean test accuracy of a victim `arch` trained
        from scratch on `train` (trial `trial`: seed + trial); kept in the run as `name`."""
        saved = self.run.load_checkpoint(name)
        if saved is not None:
            return saved[0]["pred"], float(saved[1]["accuracy"])
        t0 = time.perf_counter()
        torch.manual_seed(self.seed + trial)
        model = factory(arch, self.data)()
        store = RunCheckpoint(self.run, f"train-{name}")
        train_classifier(model, train, self.cfg.victims.train, progress=self.progress,
                         checkpoint=store, seed=self.seed + trial)
        pred = predict_logits(model, x_targets).argmax(1)
        accuracy = clean_accuracy(model, self.data.test)
        self.run.save_checkpoint(name, {"pred": pred}, {"accuracy": accuracy})
        self.run.checkpoint_path(f"train-{name}").unlink(missing_ok=True)
        self.seconds["victims"] = self.seconds.get("victims", 0.0) + time.perf_counter() - t0
        return pred, accuracy

    def baseline(self) -> dict[str, Outcomes]:
        """The unperturbed baseline: victims on the clean subset classify every target."""
        x = torch.stack([t.x for t in self.targets])
        out = {}
        for arch in self.cfg.victims.archs:
            runs = [self.victim(f"victim-clean-{arch}-{k}", arch, self.data.train, k, x)
                    for k in range(self.cfg.victims.trials_of(arch))]
            out[arch] = Outcomes(
                [[bool(pred[i] == self.adv) for pred, _ in runs] for i in range(len(x))],
                [[acc for _, acc in runs] for _ in range(len(x))])
        return out

    # ---- crafting --------------------------------------------------------------------------
    def poisons(self, attack: str, j: int, target: Target) -> Poisons:
        """The poisons of `attack` on surrogate architecture j for `target` (kept in the run)."""
        arch = self.cfg.surrogates[j]
        key = f"{attack}-{arch}-t{target.id}"
        path = self.run.checkpoint_path(f"poisons-{key}")
        if path.exists():
            return Poisons.load(path)
        t0 = time.perf_counter()
        craft_seed = self.seed + 1000 * (j + 1) + target.id
        if attack == "metapoison":
            poisons = self._metapoison(arch, craft_seed, target, f"craft-{key}")
        else:
            poisons = self._gradient_matching(j, craft_seed, target)
        poisons.save(path, {"target_id": target.id, "adv_class": self.adv, "surrogate": arch})
        self.run.checkpoint_path(f"craft-{key}").unlink(missing_ok=True)
        self.seconds[f"craft_{attack}"] = (self.seconds.get(f"craft_{attack}", 0.0)
                                           + time.perf_counter() - t0)
        return poisons

    def _metapoison(self, arch: str, seed: int, target: Target, state_name: str) -> Poisons:
        attack = MetaPoison(factory(arch, self.data), config=self.cfg.metapoison, seed=seed)
        saved = self.run.load_state(state_name)
        resume = CraftState(**saved) if saved is not None else None
        steps = self.cfg.metapoison.craft_steps
        done = resume.step if resume is not None else 0

        def keep(state: CraftState) -> None:
            self.run.save_state(state_name, {f.name: getattr(state, f.name) for f in fields(state)})

        with progress_bar(steps - done, f"MetaPoison target {target.id}",
                          enabled=self.progress) as bar:
            return attack.craft(self.data.train, self.poison_idx, target.x, self.adv,
                                target_label=target.label, checkpoint=keep, resume=resume,
                                progress=lambda status: bar.advance(status=status))

    def _gradient_matching(self, j: int, seed: int, target: Target) -> Poisons:
        surrogate = self.surrogate(j)
        cfg = self.cfg.gradient_matching
        attack = GradientMatching(surrogate, config=cfg, seed=seed)
        with progress_bar(cfg.restarts * cfg.iterations, f"gradient matching target {target.id}",
                          enabled=self.progress) as bar:
            return attack.craft(self.data.train, self.poison_idx, target.x, self.adv,
                                progress=lambda status: bar.advance(status=status),
                                target_label=target.label)

    def surrogate(self, j: int) -> torch.nn.Module:
        """Gradient matching's surrogate j: trained on the clean subset (kept in the run)."""
        arch = self.cfg.surrogates[j]
        torch.manual_seed(self.seed + 500 + j)
        model = factory(arch, self.data)()
        saved = self.run.load_checkpoint(f"surrogate-{arch}")
        if saved is not None:
            model.load_state_dict(saved[0])
            return model.eval()
        train_classifier(model, self.data.train, self.cfg.victims.train, progress=self.progress,
                         checkpoint=RunCheckpoint(self.run, f"train-surrogate-{arch}"),
                         seed=self.seed + 500 + j)
        self.run.save_checkpoint(f"surrogate-{arch}",
                                 {k: v.detach().cpu().contiguous()
                                  for k, v in model.state_dict().items()})
        self.run.checkpoint_path(f"train-surrogate-{arch}").unlink(missing_ok=True)
        return model.eval()

    # ---- the protocol ----------------------------------------------------------------------
    def attack(self, name: str, baseline: dict[str, Outcomes]) -> AttackResult:
        """Craft on every surrogate for every target; victims of every architecture."""
        cells: dict[str, dict[str, Outcomes]] = {}
        for j, arch in enumerate(self.cfg.surrogates):
            row = {v: Outcomes([], []) for v in self.cfg.victims.archs}
            for i, target in enumerate(self.targets):
                poisons = self.poisons(name, j, target)
                if j == 0:
                    self._keep_record(name, i, poisons)
                poisoned = poisons.apply(self.data.train)
                for v in self.cfg.victims.archs:
                    runs = [self.victim(f"victim-{name}-{arch}-t{target.id}-{v}-{k}", v, poisoned,
                                        k, target.x.unsqueeze(0))
                            for k in range(self.cfg.victims.trials_of(v))]
                    row[v].success.append([bool(pred[0] == self.adv) for pred, _ in runs])
                    row[v].accuracy.append([acc for _, acc in runs])
            cells[arch] = row
        return AttackResult(name, [t.id for t in self.targets], cells, baseline)

    def _keep_record(self, name: str, i: int, poisons: Poisons) -> None:
        history = poisons.history
        curve = history if isinstance(history, torch.Tensor) else torch.tensor(history["loss"])
        self.record.losses.setdefault(name, []).append(curve)
        if i == 0:
            idx = self.poison_idx[:EXAMPLES]
            self.record.originals = self.data.train.x[idx]
            self.record.poisoned[name] = poisons.apply(self.data.train).x[idx]


def evaluate(cfg: StudyConfig, run: Run, data: PoisonData, *, seed: int = 0,
             progress: bool = True) -> StudyResult:
    """Run the study (see the module docstring) and return its typed result."""
    study = Study(cfg, run, data, seed=seed, progress=progress)
    baseline = study.baseline()
    attacks = {name: study.attack(name, baseline) for name in cfg.attacks}
    return StudyResult(data.dataset, data.classes, len(data.train), len(study.poison_idx),
                       cfg.targets.poison_class, cfg.targets.target_class, study.adv, attacks,
                       baseline, study.seconds, study.record)
