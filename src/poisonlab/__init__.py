"""poisonlab: red-team and audit ML models against training-time attacks.

Data poisoning, backdoors (few-shot support-set backdoors, MCL purification, Neural Cleanse,
BadEncoder, MetaPoison) and membership inference, on plain PyTorch tensors.
"""

__version__ = "0.1.0"
