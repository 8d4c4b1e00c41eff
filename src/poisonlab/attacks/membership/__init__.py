"""Membership inference attacks: was a record in the target model's training set?

Every attack follows one contract (poisonlab.attacks.membership.base): `fit(references)` on
reference models' outputs with their membership masks (attacks that need none return self), then
`score(queried)` on what the attacker got from the target → one score per record, higher = more
likely a member; score them with poisonlab.metrics.membership_metrics. Attacks by name:
MEMBERSHIP_ATTACKS / get_attack. Modules: threshold (loss/confidence baseline), shadow (Shokri et
al. 2017), lira (Carlini et al. 2022), label_only (Choquette-Choo et al. 2021).
"""

from poisonlab.attacks.membership.base import MembershipAttack, Queried, Reference
from poisonlab.attacks.membership.common import check_records, logit_confidence
from poisonlab.attacks.membership.label_only import (
    LabelOnlyAttack,
    default_augmentations,
    label_oracle,
)
from poisonlab.attacks.membership.lira import LiRA, random_halves
from poisonlab.attacks.membership.registry import MEMBERSHIP_ATTACKS, get_attack
from poisonlab.attacks.membership.shadow import ShadowModelAttack
from poisonlab.attacks.membership.threshold import ThresholdAttack

__all__ = [
    "MEMBERSHIP_ATTACKS",
    "LabelOnlyAttack",
    "LiRA",
    "MembershipAttack",
    "Queried",
    "Reference",
    "ShadowModelAttack",
    "ThresholdAttack",
    "check_records",
    "default_augmentations",
    "get_attack",
    "label_oracle",
    "logit_confidence",
    "random_halves",
]
