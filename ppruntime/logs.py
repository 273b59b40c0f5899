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
from typing import TYPE_CHECKING

from ppruntime.config import ConfigError

if TYPE_CHECKING:  # no MPI on import: the CLI checks the level before MPI starts
    from ppruntime.comm.mpi_env import RankInfo

LOGGER_NAME = "ppruntime"


def setup_logging(info: RankInfo, level: str | None = None, log_dir: str | None = None) -> None:
    """Raises ConfigError naming the flag (or variable) when the level or directory
    cannot be used; nothing is changed then."""
    level = check_log_level(level)
    dir_source = "--log-dir" if log_dir else "PPRUNTIME_LOG_DIR"
    log_dir = log_dir or os.environ.get("PPRUNTIME_LOG_DIR")
    log_file = _checked_log_file(log_dir, info.rank, dir_source) if log_dir else None
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
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        file_handler.setLevel(_parse_level(level) if level else logging.INFO)
        root.addHandler(file_handler)
        root.setLevel(min(root.level, file_handler.level))
    root.propagate = False


HTTP_PROCESS_LOG = "http.log"  # `ppruntime serve`'s HTTP process, beside rank 0's file


def setup_http_process_logging(prefix: str, level: str | None, log_dir: str | None) -> None:
    """The HTTP process of `ppruntime serve`: its own lines (ppruntime.*) and uvicorn's at
    `level` (--log-level as rank 0 resolved it; None: WARNING, as uvicorn's INFO lines are
    one a connection), to stderr and, with `log_dir` (checked by rank 0), to
    DIR/http.log, at `level` or INFO there, as the ranks' files are. Raises OSError when
    the file cannot be opened."""
    formatter = logging.Formatter(
        f"{prefix} %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    )
    console_level = _parse_level(level) if level else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(console_level)
    if log_dir:
        file_handler = logging.FileHandler(
            os.path.join(log_dir, HTTP_PROCESS_LOG), encoding="utf-8"
        )
        file_handler.setLevel(_parse_level(level) if level else logging.INFO)
        handlers.append(file_handler)
    for name in (LOGGER_NAME, "uvicorn"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(min(handler.level for handler in handlers))
        logger.propagate = False


def check_log_level(level: str | None) -> str | None:
    """The level in use (--log-level, else PPRUNTIME_LOG_LEVEL), or ConfigError naming
    the one that is not a logging level."""
    source = "--log-level" if level else "PPRUNTIME_LOG_LEVEL"
    level = level or os.environ.get("PPRUNTIME_LOG_LEVEL")
    if level:
        _parse_level(level, source)
    return level


def _parse_level(level: str, source: str = "--log-level") -> int:
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ConfigError(
            f"{source} {level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR"
        )
    return value


def _checked_log_file(log_dir: str, rank: int, source: str) -> str:
    """DIR/rank-<r>.log, once DIR exists (created if missing) and the file can be
    appended to."""
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ConfigError(f"{source} {log_dir}: exists and is not a directory")
    path = os.path.join(log_dir, f"rank-{rank}.log")
    try:
        os.makedirs(log_dir, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ConfigError(f"{source} {log_dir}: cannot write {path} ({error.strerror})") from None
    return path


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")
