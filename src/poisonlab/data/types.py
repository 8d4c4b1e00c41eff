"""The two shapes every loader returns: a few-shot class bank and a supervised image set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from poisonlab.errors import ShapeError


@dataclass
class FewShotData:
    """A bank of classes for few-shot episodes.

    images: float32 tensor [num_classes, samples_per_class, channels, H, W] in [0, 1]
    class_names: one name per class (e.g. "Latin/character01")
    groups: the group of each class (Omniglot: its alphabet; glyphs: its script)
    """

    images: torch.Tensor
    class_names: list[str]
    groups: list[str]

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def samples_per_class(self) -> int:
        return int(self.images.shape[1])

    def subset(self, class_indices: torch.Tensor | list[int]) -> FewShotData:
        idx = torch.as_tensor(class_indices, dtype=torch.long)
        return FewShotData(
            images=self.images[idx],
            class_names=[self.class_names[i] for i in idx.tolist()],
            groups=[self.groups[i] for i in idx.tolist()],
        )


@dataclass
class ImageSet:
    """x: float32 [N, C, H, W] in [0, 1]; y: int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[index], self.y[index])

    def downsampled(self, factor: int) -> ImageSet:
        """The images average-pooled by `factor` (itself when factor is 1)."""
        if factor == 1:
            return self
        if factor > min(self.x.shape[-2:]):
            raise ShapeError(f"downsample factor {factor} is larger than the "
                             f"{self.x.shape[-2]}x{self.x.shape[-1]} images")
        return ImageSet(torch.nn.functional.avg_pool2d(self.x, factor), self.y)


@dataclass
class SupervisedData:
    """A train/test pair of labelled image sets with class names (label i = classes[i])."""

    train: ImageSet
    test: ImageSet
    classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subsampled(self, train_size: int | None, test_size: int | None,
                   generator: torch.Generator) -> SupervisedData:
        """Seeded random subsets of `train_size` and `test_size` images (None, or a size not
        below the split's: all of it), drawn from `generator` in that order."""
        train, test = self.train, self.test
        if train_size is not None and train_size < len(train):
            train = train.subset(torch.randperm(len(train), generator=generator)[:train_size])
        if test_size is not None and test_size < len(test):
            test = test.subset(torch.randperm(len(test), generator=generator)[:test_size])
        return SupervisedData(train, test, self.classes)
