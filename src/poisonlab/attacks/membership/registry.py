"""The membership attacks by name: `get_attack("lira", online=False)`."""

from __future__ import annotations

from typing import Any

from poisonlab.attacks.membership.base import MembershipAttack
from poisonlab.attacks.membership.label_only import LabelOnlyAttack
from poisonlab.attacks.membership.lira import LiRA
from poisonlab.attacks.membership.shadow import ShadowModelAttack
from poisonlab.attacks.membership.threshold import ThresholdAttack
from poisonlab.errors import ConfigError

MEMBERSHIP_ATTACKS: dict[str, type[MembershipAttack]] = {
    cls.name: cls for cls in (ThresholdAttack, ShadowModelAttack, LiRA, LabelOnlyAttack)
}


def get_attack(name: str, **kwargs: Any) -> MembershipAttack:
    """The attack `name` built with `kwargs` (config=, seed=, its settings, and for LiRA
    augmentations=); an unknown name is a one-line ConfigError listing the known ones."""
    if name not in MEMBERSHIP_ATTACKS:
        raise ConfigError(f"unknown membership attack '{name}' (known: "
                          f"{', '.join(sorted(MEMBERSHIP_ATTACKS))})")
    return MEMBERSHIP_ATTACKS[name](**kwargs)
