"""`ppruntime generate --output FILE`: results that survive a failed job.

Each request is appended as one JSON line (its input `index`, then the keys of
`--json`) and flushed the moment it finishes, so a job killed midway (a rank lost,
Slurm's time limit) leaves every finished request in the file. At a clean end the
file is rewritten in input order, atomically (a temporary file, then `os.replace`):
a reader sees either the appended lines or the ordered file, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppruntime.engine.outputs import RequestOutput


def result_record(index: int, output: RequestOutput) -> dict:
    return {"index": index, **output.to_json()}


class ResultsFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by finalize)

    def append(self, index: int, output: RequestOutput) -> None:
        """One finished request, written through to the OS (it survives this process)."""
        self._handle.write(json.dumps(result_record(index, output)) + "\n")
        self._handle.flush()

    def finalize(self, outputs: list[tuple[int, RequestOutput]]) -> None:
        """Replace the file by the same records in input order (atomically)."""
        self._handle.close()
        directory, name = os.path.split(os.path.abspath(self.path))
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                for index, output in sorted(outputs, key=lambda item: item[0]):
                    handle.write(json.dumps(result_record(index, output)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, os.stat(self.path).st_mode & 0o777)  # mkstemp makes it 0600
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def close(self) -> None:
        self._handle.close()
