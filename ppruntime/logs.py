"""Per-rank logging: every line says which rank and host wrote it.

By default only rank 0 logs INFO (other ranks log WARNING and above), so a PP=8
job does not print everything eight times. `--log-level` sets the level on every
rank; `--log-dir DIR` additionally writes one file per rank (DIR/rank-<r>.log) at
that level, which is where a hang or crash on a non-zero rank is investigated.
"""

from __future__ import annotations

import logging
import os
import sys

from ppruntime.comm.mpi_env import RankInfo

LOGGER_NAME = "ppruntime"


def setup_logging(info: RankInfo, level: str | None = None, log_dir: str | None = None) -> None:
    level = level or os.environ.get("PPRUNTIME_LOG_LEVEL")
    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(
        f"{info.prefix} %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    )
    console_level = (
        _parse_level(level) if level else (logging.INFO if info.rank == 0 else logging.WARNING)
    )
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(console_level)
    root.addHandler(console)
    root.setLevel(min(console_level, _parse_level(level) if level else logging.INFO))
    log_dir = log_dir or os.environ.get("PPRUNTIME_LOG_DIR")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(log_dir, f"rank-{info.rank}.log"))
        file_handler.setFormatter(formatter)
        file_handler.setLevel(_parse_level(level) if level else logging.INFO)
        root.addHandler(file_handler)
        root.setLevel(min(root.level, file_handler.level))
    root.propagate = False


def _parse_level(level: str) -> int:
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(
            f"--log-level {level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR"
        )
    return value


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
