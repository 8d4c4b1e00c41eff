"""What every check of `scan` shares: the scan's settings, the context a check is given and
the result it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from torch import nn

from poisonlab.config import Distinct, Settings
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mm_bd import MMBD
from poisonlab.defenses.neural_cleanse import InversionConfig, NeuralCleanse
from poisonlab.errors import printable
from poisonlab.report.html import Section

# The backdoor check's detectors by option name: Neural Cleanse (Wang et al., S&P 2019) and
# MM-BD (Wang, Xiang, Miller, Kesidis, S&P 2024).
DETECTORS = {"nc": "neural cleanse", "mmbd": "MM-BD"}


class ScanConfig(Settings):
    """Settings of `scan`.

    samples: clean images drawn (with the seed) for the backdoor check.
    steps: Neural Cleanse optimisation passes per label; the inversion stops early after
        max(5, steps // 4) passes without a smaller mask (once λ went up and down).
    batch_size: Neural Cleanse mini-batch size.
    threshold: anomaly index above which a label whose trigger is smaller than the median is
        flagged (Wang et al. 2019 use 2).
    restarts: independent random starts per label; a label's size is the smallest found, and
        the index's spread over the restarts is reported.
    band: a largest index within threshold ± band is reported as inconclusive; flagged above.
    detectors: the backdoor check's detectors, "nc" (Neural Cleanse, on the clean sample) and/or
        "mmbd" (MM-BD, no clean data: each class's maximum margin); a comma-separated string or
        a list, kept in the order of DETECTORS.
    mm_bd: MM-BD's settings (its defaults: 8 starts, 300 Adam steps, alpha 0.05).
    records: at most this many records from each membership record set, drawn with the seed
        (None: all of a file or folder, 1000 of a data-set split).
    label_only: also run the label-only membership attack.
    """

    samples: int = Field(200, ge=1)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(50, ge=1)
    threshold: float = Field(2.0, gt=0, allow_inf_nan=False)
    restarts: int = Field(3, ge=1, le=100)
    band: float = Field(0.5, ge=0, allow_inf_nan=False)
    detectors: Annotated[tuple[str, ...], Distinct] = tuple(DETECTORS)
    mm_bd: MMBD.Config = Field(default_factory=MMBD.Config)
    records: int | None = Field(None, ge=1)
    label_only: bool = False

    @field_validator("detectors", mode="before")
    @classmethod
    def _known_detectors(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            raise ValueError(f"detectors must be names ({', '.join(DETECTORS)}), comma-separated")
        names = [str(n).strip() for n in value]
        unknown = [n for n in names if n not in DETECTORS]
        if unknown or not names:
            raise ValueError(f"unknown detector '{unknown[0] if unknown else ''}' (known: "
                             f"{', '.join(DETECTORS)}, comma-separated)")
        return tuple(n for n in DETECTORS if n in names)

    def detection(self) -> NeuralCleanse.Config:
        """The Neural Cleanse settings these stand for (the rest: Neural Cleanse's defaults)."""
        inversion = InversionConfig(steps=self.steps, batch_size=self.batch_size,
                                    early_stop_patience=max(5, self.steps // 4))
        return NeuralCleanse.Config(inversion=inversion, threshold=self.threshold,
                                    restarts=self.restarts, band=self.band)


@dataclass
class RecordSets:
    """Members (training records of the model) and non-members, with where each came from."""

    members: ImageSet
    non_members: ImageSet
    members_source: str = "the members"
    non_members_source: str = "the non-members"


@dataclass
class ScanContext:
    """What every check gets: the model, the clean sample (None when no check needs it), the
    membership record sets (None likewise), the class names, the settings, and where figures
    go (None: no figures)."""

    model: nn.Module
    clean: ImageSet | None
    records: RecordSets | None
    classes: list[str]
    config: ScanConfig
    seed: int
    progress: bool
    report_dir: Path | None


class CheckResult(ABC):
    """One check's outcome: the verdict line (and notes printed under it), whether it found a
    problem, its report section and its summary in scan.json."""

    name: str

    @property
    @abstractmethod
    def detected(self) -> bool:
        """True when the check found what it looks for (a backdoor, leakage)."""

    @property
    @abstractmethod
    def verdict(self) -> str:
        """One line: what the check concludes."""

    @property
    def notes(self) -> list[str]:
        """Lines printed (indented) under the verdict."""
        return []

    @abstractmethod
    def section(self) -> Section:
        """The check's section of report.html."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The check's summary as plain JSON values (its key in scan.json is `name`)."""

    def text(self) -> str:
        """The verdict and the notes as printed in the terminal."""
        return verdict_text(self.verdict, self.notes)


def verdict_text(verdict: str, notes: list[str]) -> str:
    """A verdict and its notes (indented) as printed in the terminal, a class folder's or a
    file's name in them shown escaped (a newline or an ANSI escape printed as itself)."""
    return "\n".join(printable(line) for line in [verdict, *(f"  {note}" for note in notes)])
