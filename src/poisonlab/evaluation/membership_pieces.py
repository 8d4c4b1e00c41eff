"""The membership study's independent pieces: its Shokri shadow models and LiRA reference models.

Each is a seeded training that depends only on its own inputs (architecture, seed, which records of
a shared set it trains on, the recipe), so all of them can train at once on an executor before the
sequential study runs. `train_piece` builds and trains one exactly as `Study.train_model` would
(initial weights from `torch.manual_seed(seed)`, then `train_classifier(..., seed=seed)` on the same
records in the same order) and returns its weights; the driver records each arriving model as the
run checkpoint `model-<name>`, which `Study.train_model` then loads instead of training. A resumed
run leaves out the models already recorded.

The shared sets (shadow-in ∪ shadow-out, and the evaluation records) go to the executor once per
call; a piece carries only a boolean mask into one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.executors import Executor, run_missing
from poisonlab.models import build_model
from poisonlab.training.supervised import TrainConfig, train_classifier


@dataclass(frozen=True)
class ModelPiece:
    """One model to train: `name` (checkpoint model-<name>), `arch` for `num_classes` classes of
    `channels`-channel images, initial weights and batch order from `seed`, trained with `recipe`
    on the records of shared set `source` where `mask` (bool over that set) is true."""

    name: str
    arch: str
    seed: int
    source: str
    mask: torch.Tensor
    recipe: TrainConfig
    num_classes: int
    channels: int


def train_piece(piece: ModelPiece, *, sets: dict[str, ImageSet]) -> dict:
    """Train one model; return its weights (CPU) and a summary of its training history."""
    torch.manual_seed(piece.seed)
    model = build_model(piece.arch, piece.num_classes, piece.channels)
    train = sets[piece.source].subset(piece.mask)
    history = train_classifier(model, train, piece.recipe, progress=False, seed=piece.seed,
                               device=default_device())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state": state, "records": len(train), "epochs": piece.recipe.epochs,
            "seconds": float(sum(history["epoch_seconds"])),
            "train_acc": history["train_acc"][-1] if history["train_acc"] else float("nan")}


def train_pieces(run, pieces: dict[str, ModelPiece], sets: dict[str, ImageSet],
                 executor: Executor | None, *, cpus: int = 1, progress: bool = True) -> None:
    """Train the `pieces` not yet recorded in `run` on `executor` and record each as it arrives
    (checkpoint model-<name>, with the metadata `Study.train_model` writes)."""
    missing = {name: p for name, p in pieces.items()
               if not run.checkpoint_path(f"model-{name}").exists()}

    def record(name: str, result: dict) -> None:
        piece = pieces[name]
        run.save_checkpoint(f"model-{name}", result["state"],
                            {"arch": piece.arch, "model": name, "dropout": 0.0})
        run.log(f"{name}: trained {result['epochs']} epochs on {result['records']} records in "
                f"{result['seconds']:.0f}s, train accuracy {result['train_acc']:.4f} "
                f"({getattr(executor, 'name', 'local')} piece)")

    run_missing(executor, train_piece, missing, record, shared={"sets": sets}, cpus=cpus,
                description="shadow and reference models" if progress else "")
