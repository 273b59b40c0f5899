"""`ppruntime serve`: an OpenAI-compatible HTTP server on the pipeline.

Every rank builds the engine (collective); ranks > 0 serve the pipeline as they do
for `generate`. Rank 0 runs uvicorn in a thread and steps the engine in its main
thread. SIGTERM (or Ctrl-C) stops accepting requests (503), gives running ones
`--shutdown-grace` seconds, aborts the rest, shuts every rank down and exits 0; a
second signal aborts the job at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from ppruntime.api.cli_generate import (
    EXIT_BAD_INPUT,
    add_engine_arguments,
    agree_on_error,
    start_engine,
)

STARTUP_WAIT_S = 30.0


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
        "--http-time-share",
        type=float,
        default=0.2,
        help="at most about this share of rank 0's time goes to streaming responses (it "
        "shares the GIL with the engine); when streaming costs more, chunks carry several "
        "tokens (default 0.2; 1 = a chunk per engine step)",
    )
    http.add_argument(
        "--gil-switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for rank 0 (default: Python's 5 ms): how long the engine "
        "thread may wait for the GIL while the HTTP thread holds it",
    )
    http.add_argument("--trace", default=None, help="write a Chrome trace of all ranks here")
    add_engine_arguments(parser)
    add_common(parser)
    parser.set_defaults(run=run_serve)


def _check_http_flags(args: argparse.Namespace) -> str | None:
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535], got {args.port}"
    if args.max_waiting < 0:
        return f"--max-waiting must be >= 0, got {args.max_waiting}"
    if args.max_body_bytes < 1024:
        return f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}"
    if not args.shutdown_grace >= 0:
        return f"--shutdown-grace must be >= 0, got {args.shutdown_grace}"
    if not 0 < args.http_time_share <= 1:
        return f"--http-time-share must be in (0, 1], got {args.http_time_share}"
    interval = args.gil_switch_interval_ms
    if interval is not None and not 0.01 <= interval <= 100:
        return f"--gil-switch-interval-ms must be in [0.01, 100], got {interval}"
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"{error.name} is missing: pip install 'ppruntime[serve]'"
    return None


def run_serve(args: argparse.Namespace) -> int:
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
    import uvicorn

    from ppruntime.api.chat_template import ChatTemplateError, load_chat_template
    from ppruntime.api.server import build_app
    from ppruntime.api.server_metrics import ServerMetrics
    from ppruntime.api.serving import EngineDriver
    from ppruntime.comm.failure import report_and_abort
    from ppruntime.model import is_preset

    model = llm.config.model
    try:
        template = None if is_preset(model) else load_chat_template(model)
    except (ChatTemplateError, OSError, ValueError) as error:
        llm.shutdown()
        print(f"ppruntime serve: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.gil_switch_interval_ms is not None:
        sys.setswitchinterval(args.gil_switch_interval_ms / 1000)
    driver = EngineDriver(llm, args.max_waiting)
    name = args.served_model_name or model
    app = build_app(
        driver, name, template, args.max_body_bytes, ServerMetrics(), args.http_time_share
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, name="http", daemon=True)
    http.start()
    started = time.monotonic()
    while not server.started and http.is_alive() and time.monotonic() - started < STARTUP_WAIT_S:
        time.sleep(0.02)
    if not server.started:
        llm.shutdown()
        print(
            f"ppruntime serve: error: could not listen on {args.host}:{args.port} "
            "(see the message above; is the port in use?)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"ppruntime serve: listening on http://{args.host}:{port} (model {name})", flush=True)

    def on_signal(signum: int, frame: object) -> None:
        if driver.stop_requested.is_set():
            report_and_abort(llm.info, f"second signal {signum} received, aborting", 143)
        driver.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    driver.run(grace_s=args.shutdown_grace)
    server.should_exit = True
    http.join(timeout=10.0)
    llm.shutdown()
    print("ppruntime serve: stopped", flush=True)
    return 0
