"""SQLite index of runs: one row per run directory, for fast listing and filtering.

The run directories are the source of truth; the index only mirrors their run.json and headline
metrics, and `rebuild_index` recreates it from them. A run that belongs to a sweep carries
`"sweep": {"id": ..., "point": ...}` in its run.json, so the sweep grouping (columns `sweep_id`,
`sweep_point`) is rebuilt with the rest. Several processes may write it at once:
the database is in WAL mode with a busy timeout, every write is one short transaction, and a
write that still meets "database is locked" is retried with a randomised back-off.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from poisonlab.errors import RunError
from poisonlab.runs.layout import read_run_dir, read_run_info, runs_root

INDEX_NAME = "index.sqlite"
COLUMNS = ("run_id", "experiment", "config_hash", "status", "started", "ended", "headline", "path",
           "sweep_id", "sweep_point")
HEADLINE_LIMIT = 12
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    config_hash TEXT,
    status TEXT NOT NULL,
    started TEXT,
    ended TEXT,
    headline TEXT,
    path TEXT NOT NULL,
    sweep_id TEXT,
    sweep_point TEXT
)
"""
# Columns added after the first schema: an older index gains them (NULL: not in a sweep).
_ADDED = {"sweep_id": "TEXT", "sweep_point": "TEXT"}
_ATTEMPTS = 40
T = TypeVar("T")


def index_path(root: Path) -> Path:
    return Path(root) / INDEX_NAME


@contextmanager
def _connect(root: Path) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit), WAL, 30 s busy timeout."""
    Path(root).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(index_path(root), timeout=30.0, isolation_level=None)
    with closing(conn):
        conn.execute("PRAGMA busy_timeout = 30000")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(_SCHEMA)
        _add_missing_columns(conn)
        yield conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    for name, kind in _ADDED.items():
        if name not in have:
            try:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc).lower():
                    raise


def _with_retry(action: Callable[[sqlite3.Connection], T], root: Path) -> T:
    """Run `action` on a fresh connection, retrying while the database is locked or busy. An
    index that is not a usable database (corrupt, truncated, empty) is set aside and rebuilt from
    the run directories, which are the source of truth, before `action` runs."""
    path = index_path(root)
    delay = 0.01
    recovered = False
    for attempt in range(_ATTEMPTS):
        try:
            with _connect(root) as conn:
                return action(conn)
        except sqlite3.OperationalError as exc:
            message = str(exc).lower()
            if "locked" in message or "busy" in message:
                if attempt == _ATTEMPTS - 1:
                    raise RunError(f"cannot update the run index {path}: {exc}") from None
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            if recovered or _RECOVERING or not (path.exists() or path.is_symlink()):
                raise RunError(f"cannot update the run index {path}: {exc}") from None
            _set_aside(root, str(exc))
            recovered = True
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a bad value or call, not a damaged file: rebuilding would not help
        except sqlite3.DatabaseError as exc:  # not a database, malformed
            if recovered or _RECOVERING:
                raise RunError(f"cannot update the run index {path}: {exc}") from None
            _set_aside(root, str(exc))
            recovered = True
    raise RunError(f"cannot update the run index {path}")


_SAID: set[tuple[str, tuple[str, ...]]] = set()  # unreadable-run warnings already printed
_RECOVERING: set[str] = set()  # roots whose index is being rebuilt: a rebuild never recurses


def _set_aside(root: Path, reason: str) -> None:
    """Move an unusable index (and its WAL files) aside, rebuild it, say so in one line. A
    rebuild that fails in turn is a RunError, not a second setting aside."""
    path = index_path(root)
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(16**4):04x}")
    path.replace(bad)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(bad.with_name(bad.name + suffix))
    _RECOVERING.add(str(root))
    try:
        count = rebuild_index(root)
    finally:
        _RECOVERING.discard(str(root))
    print(f"warning: the run index {path} was unusable ({reason}); moved to {bad.name} and "
          f"rebuilt from {count} run directories", file=sys.stderr)


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers shown in listings: `metrics["headline"]` if present, else the top-level
    numbers of metrics.json (at most 12)."""
    source = metrics.get("headline")
    if isinstance(source, Mapping):
        flat = flatten_numbers(source)
    else:
        flat = {k: v for k, v in metrics.items() if _is_number(v)}
    return dict(list(flat.items())[:HEADLINE_LIMIT])


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers of a nested mapping under dotted keys ({"a": {"b": 1}} → {"a.b": 1})."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, name + "."))
        elif _is_number(value):
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_run(
    root: Path, info: Mapping[str, Any], headline: Mapping[str, Any], path: Path
) -> None:
    """Insert or update the row of one run."""
    row = _row(info, headline, path)

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
            "ON CONFLICT(run_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:]),
            row,
        )

    _with_retry(write, Path(root))


def _row(info: Mapping[str, Any], headline: Mapping[str, Any], path: Path) -> tuple:
    sweep = info.get("sweep") if isinstance(info.get("sweep"), Mapping) else {}
    return (
        info["id"],
        info["experiment"],
        info.get("config_hash"),
        info.get("status", "created"),
        info.get("started"),
        info.get("ended"),
        json.dumps(dict(headline)),
        str(Path(path).resolve()),
        sweep.get("id") if isinstance(sweep.get("id"), str) else None,
        sweep.get("point") if isinstance(sweep.get("point"), str) else None,
    )


def list_runs(root: Path | str | None = None, experiment: str | None = None,
              sweep: str | None = None) -> list[dict]:
    """Indexed runs (oldest first) whose directory still exists, of one experiment and/or one
    sweep (its exact id); rebuilds a missing index."""
    root = runs_root(root)
    if not root.is_dir():
        return []
    if not index_path(root).exists() and not index_path(root).is_symlink():
        rebuild_index(root)

    def read(conn: sqlite3.Connection) -> list[tuple]:
        where = {"experiment": experiment, "sweep_id": sweep}
        where = {column: value for column, value in where.items() if value is not None}
        sql = f"SELECT {', '.join(COLUMNS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(f"{column} = ?" for column in where)
        return conn.execute(sql + " ORDER BY started, rowid", tuple(where.values())).fetchall()

    def indexed(conn: sqlite3.Connection) -> set[str]:  # every run's, not only those asked for
        return {r[0] for r in conn.execute("SELECT path FROM runs").fetchall()}

    rows = [dict(zip(COLUMNS, r, strict=True)) for r in _with_retry(read, root)]
    on_disk = {str(p.parent.resolve()) for p in root.glob("*/run.json")}
    missing = on_disk - _with_retry(indexed, root)
    if missing:  # the index is a mirror: an emptied or stale one is rebuilt from the directories
        rebuild_index(root)
        rows = [dict(zip(COLUMNS, r, strict=True)) for r in _with_retry(read, root)]
        unreadable = sorted(missing - _with_retry(indexed, root))
        if len(unreadable) < len(missing):
            print(f"warning: the run index {index_path(root)} lacked {len(missing)} run "
                  "directories; rebuilt from the directories", file=sys.stderr)
        said = (str(root), tuple(unreadable))
        if unreadable and said not in _SAID:  # not indexable until repaired: said once per
            _SAID.add(said)                   # command (process), in one line
            print(f"warning: {len(unreadable)} run directories have an unreadable run.json and "
                  f"are not listed: {', '.join(Path(p).name for p in unreadable[:5])}",
                  file=sys.stderr)
    if not all(_sound(row) for row in rows):  # a damaged row: the index is only a mirror
        rebuild_index(root)
        print(f"warning: the run index {index_path(root)} held a damaged row; rebuilt from the "
              "run directories", file=sys.stderr)
        rows = [dict(zip(COLUMNS, r, strict=True)) for r in _with_retry(read, root)]
        for row in rows:
            row["headline"] = row["headline"] if _sound(row) else {}
    return [row for row in rows if Path(row["path"]).is_dir()]


def _sound(row: dict) -> bool:
    """Parse row["headline"] (JSON of a mapping) in place; False when it is not one or another
    column is not text (SQLite keeps any type in any column: a BLOB path is damage)."""
    if not all(isinstance(row[c], str | None) for c in COLUMNS if c != "headline"):
        return False
    try:
        value = json.loads(row["headline"] or "{}")
    except (ValueError, TypeError, RecursionError):
        return False
    row["headline"] = value
    return isinstance(value, dict)


def sweep_ids(root: Path | str | None = None) -> list[str]:
    """The ids of the sweeps that have runs in the index (sorted)."""
    root = runs_root(root)
    if not root.is_dir():
        return []
    list_runs(root)  # rebuilds a missing or stale index first

    def read(conn: sqlite3.Connection) -> list[tuple]:
        return conn.execute("SELECT DISTINCT sweep_id FROM runs WHERE sweep_id IS NOT NULL "
                            "ORDER BY sweep_id").fetchall()

    return [row[0] for row in _with_retry(read, root)]


def resolve_sweep(root: Path | str | None, key: str) -> str:
    """The sweep id given as an id or a unique prefix of one; else a one-line RunError."""
    root = runs_root(root)
    known = sweep_ids(root)
    if key in known:
        return key
    matches = [s for s in known if key and s.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise RunError(f"sweep id prefix '{key}' is ambiguous under {root}: {', '.join(matches[:5])}")
    raise RunError(f"no sweep '{key}' under {root}")


def rebuild_index(root: Path | str | None = None) -> int:
    """Recreate the index from the run.json and metrics.json of every run directory."""
    root = runs_root(root)
    rows = []
    for run_json in sorted(root.glob("*/run.json")):
        try:
            info, metrics = read_run_dir(run_json.parent)
        except RunError:
            try:  # a damaged metrics.json: the run is listed, without headline numbers
                info, metrics = read_run_info(run_json.parent), {}
            except RunError:
                continue  # an unreadable run.json: skipped, not indexed
        rows.append(_row(info, headline_metrics(metrics), run_json.parent))

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM runs")
            conn.executemany(
                f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    _with_retry(write, root)
    return len(rows)
