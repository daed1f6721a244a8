"""The fault suite's log folder, and making its disk full.

The relay's processes write no files of their own: they log to stdout/stderr, which a deployment sends to
a file (or journald, or docker's log driver) on some disk. Here every process of the fault stack logs into
one folder, and "the disk is full" is made as real as this machine allows:

- a 4 MB tmpfs mounted on the folder (needs root, or CAP_SYS_ADMIN), filled to the last byte by a filler
  file: every write of a process to its log then fails with ENOSPC, exactly as on a full disk;
- where mounting is refused, RLIMIT_FSIZE lowered on the running processes (prlimit): every write to
  their log files then fails with EFBIG (Python ignores SIGXFSZ, so a write fails instead of killing it).

`free()` ends the fault (the filler is removed, or the limit lifted).
"""

from __future__ import annotations

import errno
import resource
import shutil
import subprocess
from pathlib import Path

import psutil

__all__ = ["LogDisk"]

_SIZE = "4m"


class LogDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_SIZE}", "tmpfs", str(path)],
                              capture_output=True)
        self.tmpfs = done.returncode == 0
        self._limited: list[psutil.Process] = []

    @property
    def method(self) -> str:
        return f"tmpfs of {_SIZE} filled (ENOSPC)" if self.tmpfs else "RLIMIT_FSIZE on the processes (EFBIG)"

    def fill(self, processes: list[psutil.Process]) -> int:
        """Make every further log write fail; returns the bytes the filler took (0 with the rlimit)."""
        if not self.tmpfs:
            for proc in processes:
                proc.rlimit(psutil.RLIMIT_FSIZE, (1, 1))
                self._limited.append(proc)
            return 0
        written = 0
        with (self.path / "filler").open("wb", buffering=0) as filler:
            for size in (65536, 1):  # big blocks, then the last bytes one by one
                block = b"\0" * size
                while True:
                    try:
                        written += filler.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def writable(self) -> bool:
        """Whether one more byte can be written into the folder now."""
        try:
            with (self.path / "probe").open("ab") as probe:
                probe.write(b"x")
                probe.flush()
            return True
        except OSError:
            return False

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)
        (self.path / "probe").unlink(missing_ok=True)
        for proc in self._limited:
            try:
                proc.rlimit(psutil.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except psutil.NoSuchProcess:
                pass
        self._limited.clear()

    def close(self, keep_in: Path | None = None) -> None:
        """Unmount (the logs go with it, unless copied to `keep_in` first)."""
        self.free()
        if keep_in is not None:
            shutil.copytree(self.path, keep_in, dirs_exist_ok=True)
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
