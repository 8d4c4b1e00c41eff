"""Audit a model you did not train, from Python: what `poisonlab scan` and `poisonlab purify` do.

    from poisonlab.audit import ScanConfig, load_model, scan
    model, shape = load_model("model.safetensors", "resnet20")
    report = scan(model, clean=images, config=ScanConfig(steps=60), input_shape=shape)
    print(report.backdoor.verdict, report.to_dict())

`scan` runs the checks of CHECKS (backdoor: Neural Cleanse on clean images; membership: a
loss-threshold attack on member and non-member records; trigger: the attack success rate of a
trigger the user gives, named or read from a file by TriggerSource) and returns a ScanReport of
typed CheckResults; `purify` runs MCL and returns a PurifyReport with the purified model;
`scan_encoder` scans a pre-trained encoder (no labels, no trigger) and returns an
EncoderScanReport.
"""

from poisonlab.audit.backdoor import BackdoorResult
from poisonlab.audit.checks import CheckResult, RecordSets, ScanConfig, ScanContext
from poisonlab.audit.data import CleanSubset, load_clean
from poisonlab.audit.encoder import (
    EncoderAuditConfig,
    EncoderScanReport,
    FeatureEncoder,
    load_encoder,
    scan_encoder,
)
from poisonlab.audit.membership import AttackResult, MembershipResult, load_record_sets
from poisonlab.audit.model import InputShape, load_model
from poisonlab.audit.purify import Measured, PurifyReport, find_target, known_trigger, purify
from poisonlab.audit.scan import CHECKS, ScanReport, scan, select_checks
from poisonlab.audit.trigger import TriggerResult, TriggerSource

__all__ = [
    "CHECKS",
    "AttackResult",
    "BackdoorResult",
    "CheckResult",
    "CleanSubset",
    "EncoderAuditConfig",
    "EncoderScanReport",
    "FeatureEncoder",
    "InputShape",
    "Measured",
    "MembershipResult",
    "PurifyReport",
    "RecordSets",
    "ScanConfig",
    "ScanContext",
    "ScanReport",
    "TriggerResult",
    "TriggerSource",
    "find_target",
    "known_trigger",
    "load_clean",
    "load_encoder",
    "load_model",
    "load_record_sets",
    "purify",
    "scan",
    "scan_encoder",
    "select_checks",
]
