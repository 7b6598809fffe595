"""Results of a suite in SQLite: one row per finished run, written as it finishes.

SQLite because it is in the standard library, survives a killed process (each row is
its own transaction), and several shards' files merge with one INSERT OR IGNORE.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

COLUMNS = {
    "key": "TEXT", "suite": "TEXT", "grp": "TEXT", "cell": "TEXT", "task": "TEXT",
    "model": "TEXT", "optimizer": "TEXT", "scheme": "TEXT", "lr": "REAL", "eps": "REAL",
    "status": "TEXT", "error": "TEXT", "val_accuracy": "REAL", "test_accuracy": "REAL",
    "val_before": "REAL", "peak_bytes": "INTEGER", "predicted_bytes": "INTEGER",
    "step_s": "REAL", "forward_passes": "REAL", "backward_passes": "REAL",
    "trainable_params": "INTEGER", "steps": "INTEGER", "losses": "TEXT",
    "settings": "TEXT", "report": "TEXT", "code_version": "TEXT", "host": "TEXT",
    "started": "TEXT", "finished": "TEXT",
}


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.row_factory = sqlite3.Row
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        self.db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols}, PRIMARY KEY (key, grp))")
        self.db.commit()

    def done(self) -> set[tuple[str, str]]:
        return {(r["key"], r["grp"]) for r in self.db.execute("SELECT key, grp FROM runs")}

    def add(self, row: dict) -> None:
        row = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
               for k, v in row.items() if k in COLUMNS}
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.db:  # one transaction per run: a kill loses at most the run in flight
            self.db.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})",
                            list(row.values()))

    def rows(self, suite: str | None = None) -> list[dict]:
        query = "SELECT * FROM runs" + (" WHERE suite = ?" if suite else "")
        out = []
        for r in self.db.execute(query, (suite,) if suite else ()):
            d = dict(r)
            for k in ("losses", "settings", "report"):
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out

    def merge(self, other: str | Path) -> int:
        """Copy in every run of another store that this one lacks; returns how many."""
        before = self.db.total_changes
        self.db.execute("ATTACH DATABASE ? AS other", (str(other),))
        try:
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO runs SELECT * FROM other.runs")
        finally:
            self.db.execute("DETACH DATABASE other")
        return self.db.total_changes - before

    def close(self) -> None:
        self.db.close()
