"""Limits on what a data-set archive may unpack to, so a small hostile archive (a few MB of
compressed zeros declaring a 1.5 GB member) is refused from its headers instead of filling memory.

Each loader states the bounds of its own format: the largest member it ever needs and the total it
ever reads from one archive, both well above the real data set's."""

from __future__ import annotations

from pathlib import Path

from poisonlab.errors import DataError


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


class ArchiveBudget:
    """Counts the declared sizes of the members read from `path`; `take(name, size)` raises a
    DataError before a member larger than `member_limit`, or one that takes the total past
    `total_limit`, is unpacked. `kind` names the format in the message."""

    def __init__(self, path: Path, kind: str, member_limit: int, total_limit: int) -> None:
        self.path, self.kind = path, kind
        self.member_limit, self.total_limit = member_limit, total_limit
        self.total = 0

    def take(self, name: str, size: int) -> None:
        if size > self.member_limit:
            raise DataError(f"{self.path}: member {name} unpacks to {_mib(size)}, more than the "
                            f"{_mib(self.member_limit)} any {self.kind} file needs "
                            f"(a corrupt or hostile archive)")
        self.total += size
        if self.total > self.total_limit:
            raise DataError(f"{self.path} unpacks to more than {_mib(self.total_limit)}, more than "
                            f"a {self.kind} archive holds (a corrupt or hostile archive)")
