"""`ppruntime serve`: an OpenAI-compatible HTTP server on the pipeline.

Every rank builds the engine (collective); ranks > 0 serve the pipeline as they do
for `generate`. Rank 0 steps the engine in its main thread and starts one HTTP process
(`http_process.py`: uvicorn + FastAPI) linked to it by a socket pair (`http_link.py`).
SIGTERM (or Ctrl-C) to rank 0 stops accepting requests (503), gives running ones
`--shutdown-grace` seconds, aborts the rest, shuts every rank down and exits 0; a
second signal aborts the job at once. (Signalled, Open MPI 5's mpirun kills the ranks
about half a second after forwarding: rank 0 prints its pid for that reason.) The HTTP
process exiting ends the job with exit status 1 and a message saying so; the engine
process exiting ends the HTTP process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from ppruntime.api.cli_generate import (
    EXIT_BAD_INPUT,
    add_engine_arguments,
    agree_on_error,
    start_engine,
)
from ppruntime.logs import check_log_level

STARTUP_WAIT_S = 120.0  # the HTTP process imports torch, fastapi and the tokenizer
HTTP_EXIT_WAIT_S = 15.0
EXIT_HTTP_PROCESS_FAILED = 1


def add_serve_parser(sub, add_common) -> None:
    parser = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (rank 0)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="Hugging Face checkpoint directory")
    model.add_argument(
        "--preset", help="built-in model: tiny-trained (default), tiny, bench-small, null"
    )
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    http.add_argument("--served-model-name", default=None, help="default: the model argument")
    http.add_argument(
        "--max-waiting", type=int, default=256, help="requests queued beyond what runs; then 503"
    )
    http.add_argument("--max-body-bytes", type=int, default=4 * 2**20)
    http.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds, on SIGTERM")
    http.add_argument(
        "--http-nice",
        type=int,
        default=10,
        help="the HTTP process's nice value above rank 0's (0-19, default 10): on cores it "
        "shares with the ranks, the engine runs first and streaming takes the gaps (a "
        "HTTP process that is behind writes several steps' tokens in one chunk)",
    )
    http.add_argument("--trace", default=None, help="write a Chrome trace of all ranks here")
    add_engine_arguments(parser)
    add_common(parser)
    parser.set_defaults(run=run_serve)


def _check_http_flag_values(args: argparse.Namespace) -> str | None:
    """What argv alone decides (the same on every rank, so checked before MPI)."""
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535], got {args.port}"
    if args.max_waiting < 0:
        return f"--max-waiting must be >= 0, got {args.max_waiting}"
    if args.max_body_bytes < 1024:
        return f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}"
    if not args.shutdown_grace >= 0:
        return f"--shutdown-grace must be >= 0, got {args.shutdown_grace}"
    if not 0 <= args.http_nice <= 19:
        return f"--http-nice must be in [0, 19], got {args.http_nice}"
    return None


def _check_http_flags(args: argparse.Namespace) -> str | None:
    problem = _check_http_flag_values(args)
    if problem is not None:
        return problem
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"{error.name} is missing: pip install 'ppruntime[serve]'"
    return None


def run_serve(args: argparse.Namespace) -> int:
    from ppruntime.api.early_errors import bootstrap_would_pass, report_early

    if bootstrap_would_pass(args.log_level, args.log_dir):
        problem = _check_http_flag_values(args)
        if problem is not None:
            return report_early("serve", problem)

    from ppruntime.bootstrap import bootstrap
    from ppruntime.comm.mpi_env import init_mpi
    from ppruntime.config import ConfigError

    try:
        info = bootstrap(args.log_level, args.log_dir)
        problem = _check_http_flags(args)
    except ConfigError as exc:  # a bad log dir or variable, maybe on one rank only
        info = init_mpi()
        problem = str(exc)
    problem = agree_on_error(problem, info)  # every rank stops
    if problem is not None:
        if info.rank == 0:
            print(f"ppruntime serve: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    llm = start_engine(args, info, "serve")
    if llm is None:
        return EXIT_BAD_INPUT
    if not llm.is_driver:
        return 0
    return _serve(args, llm)


def _serve(args: argparse.Namespace, llm) -> int:
    from ppruntime.api.serving import EngineDriver
    from ppruntime.comm.failure import report_and_abort

    name = args.served_model_name or llm.config.model
    link, http = _start_http_process(args, llm, name)
    port = _wait_until_listening(link, http)
    if not isinstance(port, int):
        _end_http_process(link, http)
        llm.shutdown()
        print(f"ppruntime serve: error: {port}", file=sys.stderr)
        return EXIT_BAD_INPUT
    driver = EngineDriver(llm, link)

    def on_signal(signum: int, frame: object) -> None:
        if driver.stop_requested:
            report_and_abort(llm.info, f"second signal {signum} received, aborting", 143)
        driver.stop_requested = True

    # before the line that says it listens: a SIGTERM sent on reading it gets the grace
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"ppruntime serve: listening on http://{args.host}:{port} "
        f"(model {name}; rank 0 pid {os.getpid()}, HTTP process pid {http.pid})",
        flush=True,
    )
    failure = driver.run(grace_s=args.shutdown_grace)
    _end_http_process(link, http)
    llm.shutdown()
    if failure is not None:
        print(
            f"ppruntime serve: error: {failure} ({_exit_status(http.returncode)}, pid "
            f"{http.pid}); the running requests were aborted and every rank stopped",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_HTTP_PROCESS_FAILED
    print("ppruntime serve: stopped", flush=True)
    return 0


def _start_http_process(args: argparse.Namespace, llm, name: str):
    from ppruntime.api.http_link import EngineLink

    ours, theirs = socket.socketpair()
    command = _http_process_command(theirs.fileno(), args.http_nice)
    http = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    config = llm.config
    settings = {
        "model": config.model,
        "served_name": name,
        "vocab_size": llm.vocab_size,
        "max_model_len": llm.max_model_len,
        "capacity": config.max_batch_size * config.parallel.microbatch_slots,
        "max_waiting": args.max_waiting,
        "max_body_bytes": args.max_body_bytes,
        "host": args.host,
        "port": args.port,
        # rank 0's logging settings, as bootstrap checked them (flags, else the variables)
        "log_prefix": f"[http of rank 0/{llm.info.size} {llm.info.host}]",
        "log_level": check_log_level(args.log_level),
        "log_dir": args.log_dir or os.environ.get("PPRUNTIME_LOG_DIR") or None,
    }
    link = EngineLink(ours)
    link.send([["hello", settings]])
    return link, http


def _http_process_command(fd: int, nice: int) -> list[str]:
    """This interpreter with this process's flags (-E, -s, -I, -X ...: the same modules
    found the same way), as multiprocessing starts its children."""
    interpreter = [sys.executable, *subprocess._args_from_interpreter_flags()]
    return [*interpreter, "-m", "ppruntime.api.http_process", "--fd", str(fd), "--nice", str(nice)]


def _wait_until_listening(link, http: subprocess.Popen) -> int | str:
    """The port the HTTP process listens on, or why it does not."""
    deadline = time.monotonic() + STARTUP_WAIT_S
    early = []  # a scrape or a request of the moment uvicorn listened before saying so
    while time.monotonic() < deadline:
        messages = link.receive(0.1)  # (held messages would make it return at once)
        if messages is None:
            http.wait()
            return f"the HTTP process exited while starting ({_exit_status(http.returncode)})"
        for index, message in enumerate(messages):
            if message[0] in ("listening", "failed"):
                link.hold(early + messages[index + 1 :])
                return int(message[1]) if message[0] == "listening" else str(message[1])
            early.append(message)
    return f"the HTTP process did not listen within {STARTUP_WAIT_S:.0f} s"


def _end_http_process(link, http: subprocess.Popen) -> None:
    """Close the link (the HTTP process then exits) and wait for it; kill it if it does not."""
    link.close()
    try:
        http.wait(HTTP_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        http.kill()
        http.wait()


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
