"""Where finished images live: files on disk by default, one per job, written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


class ResultStore:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, job_id: str, data: bytes, *, suffix: str = ".webp") -> str:
        """Store (or overwrite, idempotently) a job's result; returns its path."""
        path = self._root / job_id[:2] / f"{job_id}{suffix}"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file
        return str(path)

    def put_many(self, items: Sequence[tuple[str, bytes]], *, suffix: str = ".webp") -> list[str]:
        """:meth:`put` for several results, in order: one thread hop for a whole group of completions."""
        return [self.put(job_id, data, suffix=suffix) for job_id, data in items]

    def get(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
