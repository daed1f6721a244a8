"""Snapshots of the processes of one server (the granian workers of one `rr-proxy` or `rr-control-plane`) in a
run directory: one file per process, rewritten every interval by a background task, read by whichever process
serves a scrape. The request path never touches them.

Files are replaced atomically (written aside, then `os.replace`), so a reader sees a whole snapshot or the
previous one. A file that does not decode (a crash mid-write of the aside file cannot cause it, but a stray
file can) is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import msgspec

from shared.metrics.recorder import Recorder, merge

__all__ = ["SnapshotWriter", "prepare_run_dir", "prepare_server", "read_snapshots"]

log = logging.getLogger("rocket_relay.metrics")
_SUFFIX = ".snapshot"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict).decode


def prepare_run_dir(path: Path) -> Path:
    """An empty directory at `path` for a server that is starting: the snapshots of an earlier run are gone
    (their counts belong to processes that no longer exist; Prometheus sees a counter reset)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    return path


def prepare_server(metrics_dir: str, server: str) -> str:
    """Called by a server's main process before it starts its workers: the base directory the workers will
    use (`metrics_dir`, or a fresh temporary one), with an empty `<base>/<server>` in it. The caller hands
    the base to the workers (they are forked with its environment)."""
    base = metrics_dir or tempfile.mkdtemp(prefix="rr-metrics-")
    prepare_run_dir(Path(base) / server)
    return base


def read_snapshots(directory: Path) -> list[dict]:
    out = []
    for file in directory.glob(f"*{_SUFFIX}"):
        try:
            snap = _decode(file.read_bytes())
        except (OSError, msgspec.DecodeError):
            continue
        if isinstance(snap.get("c"), dict) and isinstance(snap.get("g"), dict) and isinstance(snap.get("h"), dict):
            out.append(snap)
    return out


class SnapshotWriter:
    """Writes this process's snapshot into `directory` every `interval_s`, and once more on close."""

    def __init__(self, recorder: Recorder, directory: Path, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._recorder = recorder
        self._dir = directory
        self._interval = interval_s
        self._task: asyncio.Task | None = None
        self.path = directory / f"{os.getpid()}{_SUFFIX}"

    def write(self) -> None:
        data = _encode(self._recorder.snapshot())
        aside = self.path.with_suffix(".tmp")
        aside.write_bytes(data)
        os.replace(aside, self.path)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-snapshot")

    async def _run(self) -> None:
        while True:
            try:
                self.write()
            except Exception as exc:  # a full disk must not stop the process; the scrape shows it stale
                log.warning("metrics snapshot not written (%s)", type(exc).__name__)
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            self.write()  # the last counts stay for the next scrape (counters of a stopped worker are kept)


def merged_server(recorder: Recorder, writer: SnapshotWriter | None, now: float, interval_s: float) -> dict:
    """Every worker of this server merged: this worker's snapshot as of now and the others' from the run
    directory (at most an interval old); a worker silent for three intervals counts as gone."""
    own = recorder.snapshot(now)
    if writer is None:
        return merge([own], now, stale_after_s=3 * interval_s + 1.0)
    snapshots = [s for s in read_snapshots(writer.path.parent) if s.get("pid") != own["pid"]]
    return merge([*snapshots, own], now, stale_after_s=3 * interval_s + 1.0)
