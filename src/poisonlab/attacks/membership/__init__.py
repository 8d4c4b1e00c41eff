"""Membership inference attacks: was a record in the target model's training set?

Every attack returns one score per record, higher = more likely a member; score them with
poisonlab.metrics.membership_metrics. Modules: threshold (loss/confidence baseline), shadow
(Shokri et al. 2017), lira (Carlini et al. 2022), label_only (Choquette-Choo et al. 2021).
"""

from poisonlab.attacks.membership.common import check_records, logit_confidence
from poisonlab.attacks.membership.label_only import LabelOnlyAttack, default_augmentations
from poisonlab.attacks.membership.lira import LiRA, random_halves
from poisonlab.attacks.membership.shadow import ShadowModelAttack
from poisonlab.attacks.membership.threshold import ThresholdAttack

__all__ = [
    "LabelOnlyAttack",
    "LiRA",
    "ShadowModelAttack",
    "ThresholdAttack",
    "check_records",
    "default_augmentations",
    "logit_confidence",
    "random_halves",
]
