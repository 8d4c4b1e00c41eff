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

The pieces, each seeded from its own inputs and run on an executor (poisonlab.executors): the
gradient-matching surrogates (per architecture), the crafting of every (attack, surrogate,
target) (`craft_piece`), then every victim, baseline or poisoned (`victim_piece`). With
`metapoison.slices` > 1 MetaPoison's craftings are not pieces: the driver crafts one target after
another, each on that many surrogate-slice actors of the executor (Ray actors with `--backend
ray`; in this process with `local`), and the other craftings follow as pieces. Everything
is kept in the run: the driver records each finished piece as it arrives (poisons as safetensors
Poisons files `poisons-<attack>-<arch>-t<id>`, each victim's predictions and accuracy
`victim-...`, each surrogate `surrogate-<arch>`), and a piece keeps its own in-progress state
(the craft state `craft-...` after every step, a training's epoch state `train-...`) through a
runs.StateFile, so a resumed run continues crafting from the last saved step, continues a victim
from its last epoch and skips finished pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import torch

from poisonlab.attacks.gradient_matching import GradientMatching
from poisonlab.attacks.metapoison import CraftState, MetaPoison
from poisonlab.attacks.poisons import Poisons
from poisonlab.errors import ShapeError
from poisonlab.evaluation.metapoison_config import StudyConfig
from poisonlab.evaluation.metapoison_data import PoisonData, Target, targets
from poisonlab.evaluation.metapoison_results import (
    AttackResult,
    CraftRecord,
    Outcomes,
    StudyResult,
)
from poisonlab.evaluation.pieces import run_pieces
from poisonlab.executors import Executor
from poisonlab.models import build_model
from poisonlab.progress import progress_bar
from poisonlab.runs import Run, StateFile
from poisonlab.training.supervised import (
    TrainConfig,
    predict_logits,
    train_classifier,
)
from poisonlab.training.supervised import (
    evaluate as clean_accuracy,
)

EXAMPLES = 6  # poisons shown beside their originals in the report


def factory(arch: str, data: PoisonData) -> Callable[[], torch.nn.Module]:
    """A builder of fresh `arch` networks for this data set (holding only the architecture and
    two numbers, not the data: Ray actors receive it pickled)."""
    return partial(build_model, arch, int(data.num_classes), int(data.train.x.shape[1]))


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


# ---- the pieces (module level: an executor may pickle them) ---------------------------------


@dataclass
class VictimJob:
    """One victim: `arch` trained from scratch (seed + trial) on the clean subset (poisons None)
    or on it poisoned, classifying `x_targets`; `state` keeps its epochs while it trains."""

    arch: str
    trial: int
    poisons: Poisons | None
    x_targets: torch.Tensor
    state: StateFile


def victim_piece(job: VictimJob, *, data: PoisonData, train: TrainConfig, seed: int,
                 progress: bool) -> tuple[torch.Tensor, float, float]:
    """(predicted classes of the targets, clean test accuracy, seconds) of one victim."""
    t0 = time.perf_counter()
    torch.manual_seed(seed + job.trial)
    model = factory(job.arch, data)()
    train_set = data.train if job.poisons is None else job.poisons.apply(data.train)
    train_classifier(model, train_set, train, progress=progress, checkpoint=job.state,
                     seed=seed + job.trial)
    pred = predict_logits(model, job.x_targets).argmax(1)
    return pred, clean_accuracy(model, data.test), time.perf_counter() - t0


def surrogate_piece(job: tuple[str, int, StateFile], *, data: PoisonData, train: TrainConfig,
                    seed: int, progress: bool) -> dict[str, torch.Tensor]:
    """The weights of gradient matching's surrogate (arch, j): trained on the clean subset."""
    arch, j, state = job
    torch.manual_seed(seed + 500 + j)
    model = factory(arch, data)()
    train_classifier(model, data.train, train, progress=progress, checkpoint=state,
                     seed=seed + 500 + j)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@dataclass
class CraftJob:
    """One crafting: `attack` on surrogate architecture number j for `target`, seeded by `seed`;
    `surrogate`: gradient matching's trained surrogate weights; `state`: MetaPoison's steps."""

    attack: str
    j: int
    arch: str
    seed: int
    target: Target
    state: StateFile
    surrogate: dict[str, torch.Tensor] | None = None


def craft_piece(job: CraftJob, *, data: PoisonData, cfg: StudyConfig, poison_idx: torch.Tensor,
                adv: int, seed: int, progress: bool,
                executor: Executor | None = None) -> tuple[Poisons, float]:
    """(the poisons, seconds) of one crafting; MetaPoison's surrogate slices are actors of
    `executor` (None: in this process)."""
    t0 = time.perf_counter()
    x, label = job.target.x, job.target.label
    if job.attack == "metapoison":
        attack = MetaPoison(factory(job.arch, data), config=cfg.metapoison, seed=job.seed)
        saved = job.state.load()
        resume = CraftState(**saved) if saved is not None else None
        done = resume.step if resume is not None else 0

        def keep(state: CraftState) -> None:
            job.state.save({f.name: getattr(state, f.name) for f in fields(state)})

        with progress_bar(cfg.metapoison.craft_steps - done, f"MetaPoison target {job.target.id}",
                          enabled=progress) as bar:
            poisons = attack.craft(data.train, poison_idx, x, adv, target_label=label,
                                   checkpoint=keep, resume=resume, executor=executor,
                                   progress=lambda status: bar.advance(status=status))
        return poisons, time.perf_counter() - t0
    torch.manual_seed(seed + 500 + job.j)
    surrogate = factory(job.arch, data)()
    surrogate.load_state_dict(job.surrogate)
    gm = cfg.gradient_matching
    with progress_bar(gm.restarts * gm.iterations, f"gradient matching target {job.target.id}",
                      enabled=progress) as bar:
        poisons = GradientMatching(surrogate.eval(), config=gm, seed=job.seed).craft(
            data.train, poison_idx, x, adv, target_label=label,
            progress=lambda status: bar.advance(status=status))
    return poisons, time.perf_counter() - t0


# ---- the study -----------------------------------------------------------------------------


class Study:
    """The study's state: data, poisons, targets; every piece reused from the run if there."""

    def __init__(self, cfg: StudyConfig, run: Run, data: PoisonData, *, seed: int = 0,
                 progress: bool = True, executor: Executor | None = None) -> None:
        self.cfg, self.run, self.data, self.seed, self.progress = cfg, run, data, seed, progress
        self.executor = executor
        # progress bars inside pieces only where the pieces run in this process, one at a time
        self.piece_progress = progress and (executor is None or executor.name == "local")
        self.targets: list[Target] = targets(cfg.targets, data)
        self.adv = cfg.targets.adversarial
        chooser = MetaPoison(factory(cfg.surrogates[0], data), config=cfg.metapoison, seed=seed)
        self.poison_idx = chooser.choose_poisons(data.train, cfg.targets.poison_class)
        self.seconds: dict[str, float] = {}
        self.record = CraftRecord()

    def _shared(self, **more) -> dict:
        return {"data": self.data, "seed": self.seed, "progress": self.piece_progress, **more}

    def _add_seconds(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    # ---- victims ---------------------------------------------------------------------------
    def victims(self, poisons: dict[str, Poisons]) -> dict[str, tuple[torch.Tensor, float]]:
        """(pred, accuracy) of every victim, baseline and poisoned (name: its checkpoint)."""
        x_all = torch.stack([t.x for t in self.targets])
        jobs: dict[str, VictimJob] = {}
        for v in self.cfg.victims.archs:
            for k in range(self.cfg.victims.trials_of(v)):
                jobs[f"victim-clean-{v}-{k}"] = self._victim_job(f"victim-clean-{v}-{k}", v, k,
                                                                  None, x_all)
        for key, craft in self.craftings().items():
            for v in self.cfg.victims.archs:
                for k in range(self.cfg.victims.trials_of(v)):
                    name = f"victim-{key}-{v}-{k}"
                    jobs[name] = self._victim_job(name, v, k, poisons[key],
                                                  craft.target.x.unsqueeze(0))

        def load(name: str) -> tuple[torch.Tensor, float] | None:
            saved = self.run.load_checkpoint(name)
            return None if saved is None else (saved[0]["pred"], float(saved[1]["accuracy"]))

        def save(name: str, result: tuple[torch.Tensor, float, float]) -> None:
            pred, accuracy, seconds = result
            self.run.save_checkpoint(name, {"pred": pred}, {"accuracy": accuracy})
            jobs[name].state.discard()
            self._add_seconds("victims", seconds)

        out = run_pieces(self.executor, victim_piece, jobs, load=load, save=save,
                         shared=self._shared(train=self.cfg.victims.train),
                         description="MetaPoison victims" if self.progress else "")
        return {name: (r[0], float(r[1])) for name, r in out.items()}

    def _victim_job(self, name: str, arch: str, trial: int, poisons: Poisons | None,
                    x: torch.Tensor) -> VictimJob:
        return VictimJob(arch, trial, poisons, x, self.run.state_file(f"train-{name}"))

    def baseline(self, preds: dict[str, tuple[torch.Tensor, float]]) -> dict[str, Outcomes]:
        """The unperturbed baseline: victims on the clean subset classify every target."""
        out = {}
        for arch in self.cfg.victims.archs:
            runs = [preds[f"victim-clean-{arch}-{k}"]
                    for k in range(self.cfg.victims.trials_of(arch))]
            out[arch] = Outcomes(
                [[bool(pred[i] == self.adv) for pred, _ in runs] for i in range(len(self.targets))],
                [[acc for _, acc in runs] for _ in range(len(self.targets))])
        return out

    # ---- crafting --------------------------------------------------------------------------
    def craftings(self) -> dict[str, CraftJob]:
        """The crafting of every attack, surrogate architecture j and target, keyed
        `<attack>-<arch>-t<id>` (a surrogate architecture listed twice is crafted on once)."""
        jobs: dict[str, CraftJob] = {}
        for name in self.cfg.attacks:
            for j, arch in enumerate(self.cfg.surrogates):
                for target in self.targets:
                    key = f"{name}-{arch}-t{target.id}"
                    jobs.setdefault(key, CraftJob(name, j, arch,
                                                  self.seed + 1000 * (j + 1) + target.id, target,
                                                  self.run.state_file(f"craft-{key}")))
        return jobs

    def poisons(self) -> dict[str, Poisons]:
        """The poisons of every attack, surrogate architecture and target (kept in the run as
        `poisons-<attack>-<arch>-t<id>`), crafted where the run has none."""
        jobs = self.craftings()
        paths = {key: self.run.checkpoint_path(f"poisons-{key}") for key in jobs}
        needed = {job.j for key, job in jobs.items()
                  if job.attack == "gradient_matching" and not paths[key].exists()}
        surrogates = self.surrogates(sorted(needed))
        for job in jobs.values():
            if job.attack == "gradient_matching" and job.j in surrogates:
                job.surrogate = surrogates[job.j]

        def load(key: str) -> tuple[Poisons, float] | None:
            return (Poisons.load(paths[key]), 0.0) if paths[key].exists() else None

        def save(key: str, result: tuple[Poisons, float]) -> None:
            job = jobs[key]
            result[0].save(paths[key], {"target_id": job.target.id, "adv_class": self.adv,
                                        "surrogate": job.arch})
            job.state.discard()
            self._add_seconds(f"craft_{job.attack}", result[1])

        shared = self._shared(cfg=self.cfg, poison_idx=self.poison_idx, adv=self.adv)
        sliced = {key: job for key, job in jobs.items()
                  if job.attack == "metapoison" and self.cfg.metapoison.slices > 1}
        out = run_pieces(None, partial(craft_piece, executor=self.executor), sliced, load=load,
                         save=save, shared={**shared, "progress": self.progress})
        out |= run_pieces(self.executor, craft_piece,
                          {key: job for key, job in jobs.items() if key not in sliced}, load=load,
                          save=save, shared=shared, description="MetaPoison crafting" if self.progress else "")
        return {key: out[key][0] for key in jobs}

    def surrogates(self, js: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Gradient matching's surrogates j in `js`: trained on the clean subset (kept in the
        run as `surrogate-<arch>`)."""
        archs = {f"surrogate-{self.cfg.surrogates[j]}": j for j in reversed(js)}
        jobs = {name: (self.cfg.surrogates[j], j, self.run.state_file(f"train-{name}"))
                for name, j in archs.items()}

        def load(name: str) -> dict[str, torch.Tensor] | None:
            saved = self.run.load_checkpoint(name)
            return None if saved is None else saved[0]

        def save(name: str, weights: dict[str, torch.Tensor]) -> None:
            self.run.save_checkpoint(name, weights)
            jobs[name][2].discard()

        out = run_pieces(self.executor, surrogate_piece, jobs, load=load, save=save,
                         shared=self._shared(train=self.cfg.victims.train),
                         description="gradient-matching surrogates" if self.progress else "")
        return {j: out[f"surrogate-{self.cfg.surrogates[j]}"] for j in js}

    # ---- the protocol ----------------------------------------------------------------------
    def attack(self, name: str, baseline: dict[str, Outcomes], poisons: dict[str, Poisons],
               preds: dict[str, tuple[torch.Tensor, float]]) -> AttackResult:
        """The outcomes of every surrogate × victim architecture for attack `name`."""
        cells: dict[str, dict[str, Outcomes]] = {}
        for j, arch in enumerate(self.cfg.surrogates):
            row = {v: Outcomes([], []) for v in self.cfg.victims.archs}
            for i, target in enumerate(self.targets):
                key = f"{name}-{arch}-t{target.id}"
                if j == 0:
                    self._keep_record(name, i, poisons[key])
                for v in self.cfg.victims.archs:
                    runs = [preds[f"victim-{key}-{v}-{k}"]
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
             progress: bool = True, executor: Executor | None = None) -> StudyResult:
    """Run the study (see the module docstring) on `executor` (None: local); its typed result."""
    study = Study(cfg, run, data, seed=seed, progress=progress, executor=executor)
    poisons = study.poisons()
    preds = study.victims(poisons)
    baseline = study.baseline(preds)
    attacks = {name: study.attack(name, baseline, poisons, preds) for name in cfg.attacks}
    return StudyResult(data.dataset, data.classes, len(data.train), len(study.poison_idx),
                       cfg.targets.poison_class, cfg.targets.target_class, study.adv, attacks,
                       baseline, study.seconds, study.record)
