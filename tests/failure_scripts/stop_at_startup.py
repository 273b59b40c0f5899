"""`ppruntime generate` with one rank stopping itself (SIGSTOP) during start-up.

    mpirun -n N python tests/failure_scripts/stop_at_startup.py MARKER_DIR VICTIM WHERE \
        -- GENERATE_ARGS...

Every rank writes its pid to MARKER_DIR/pid.<rank>. On rank VICTIM the process sends
itself SIGSTOP at WHERE: "loading" (at the start of loading its stage, the others
then wait for it in the start-up exchange) or "engine" (before the engine starts,
so the others wait for it before the communicators exist). Then every rank runs
`ppruntime generate GENERATE_ARGS...` as the CLI would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _stop_first(function):
    def stopped_then(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGSTOP)
        return function(*args, **kwargs)

    return stopped_then


def main() -> int:
    marker_dir, victim, where = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    generate_args = sys.argv[sys.argv.index("--") + 1 :]

    from ppruntime.bootstrap import bootstrap
    from ppruntime.cli import main as cli_main
    from ppruntime.engine.engine import PipelineEngine

    info = bootstrap()
    (marker_dir / f"pid.{info.rank}").write_text(str(os.getpid()))
    if info.rank == victim:
        name = {"loading": "_load_stage", "engine": "__init__"}[where]
        setattr(PipelineEngine, name, _stop_first(getattr(PipelineEngine, name)))
    return cli_main(["generate", *generate_args])


if __name__ == "__main__":
    sys.exit(main())
