"""The HTTP process of `ppruntime serve`: uvicorn + FastAPI, apart from the engine.

Started by rank 0's engine process (`cli_serve.py`) with one end of a socket pair as
`--fd`; it never joins MPI. It reads the "hello" settings, loads the tokenizer and the
chat template, listens, says "listening" (or "failed" with the reason) and then serves
until the engine process closes the link: SIGTERM and Ctrl-C are the engine process's
to handle (it answers them with "stopping", the grace period, and closing the link), so
this process ignores them; the engine process dying closes the link too.

    python -m ppruntime.api.http_process --fd N --nice K   (only as `ppruntime serve` starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import socket
import sys

import mpi4py

# this process must not start MPI: importing the engine's modules would (rank_stats)
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False

GRACEFUL_EXIT_S = 10.0
MAX_REQUEST_HEAD_BYTES = 16 * 1024  # a request line and headers (h11's own default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppruntime.api.http_process")
    parser.add_argument("--fd", type=int, required=True, help="this end of the engine's link")
    parser.add_argument("--nice", type=int, default=0, help="add this to the nice value")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(args.nice)  # below the engine ranks: they get a contended core first
    sock = socket.socket(fileno=args.fd)
    loop_name, http_name = fast_stack()
    if (loop_name, http_name) != ("uvloop", "httptools"):
        print(
            f"ppruntime serve: the HTTP process runs on {loop_name}'s event loop and {http_name} "
            "(uvloop or httptools not installed: pip install 'ppruntime[serve]' for a "
            "cheaper streamed token)",
            file=sys.stderr,
            flush=True,
        )
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(_serve(sock, http_name))
    return asyncio.run(_serve(sock, http_name))


def fast_stack() -> tuple[str, str]:
    """The event loop and the HTTP parser this process uses: uvloop and httptools when
    they import (a streamed token costs this process about a third less on them), else
    asyncio's own loop and h11."""
    names = []
    for fast, fallback in (("uvloop", "asyncio"), ("httptools", "h11")):
        try:
            importlib.import_module(fast)
        except ImportError:
            names.append(fallback)
        else:
            names.append(fast)
    return names[0], names[1]


async def _serve(sock: socket.socket, http_name: str) -> int:
    import uvicorn

    from ppruntime.api.chat_template import load_chat_template
    from ppruntime.api.event_stream import streams_outside
    from ppruntime.api.http_link import HEADER, decode_body, encode_frame
    from ppruntime.api.server import EngineClient, ModelFacts, build_app
    from ppruntime.api.server_metrics import ServerMetrics
    from ppruntime.logs import setup_http_process_logging
    from ppruntime.model.presets import is_preset
    from ppruntime.model.tokenizer import load_tokenizer

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the engine process handles the signals
            yield

    reader, writer = await asyncio.open_connection(sock=sock)

    async def say(message: list) -> None:
        writer.write(encode_frame([message]))
        await writer.drain()

    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        hello = decode_body(await reader.readexactly(size))[0]
    except asyncio.IncompleteReadError:
        return 1  # the engine process went away before it said hello
    settings = hello[1]
    model = settings["model"]
    try:
        setup_http_process_logging(
            settings["log_prefix"], settings["log_level"], settings["log_dir"]
        )
        tokenizer = load_tokenizer(model)
        template = None if is_preset(model) else load_chat_template(model)
    except Exception as error:  # reported by the engine process, which exits 2
        await say(["failed", f"{type(error).__name__}: {error}"])
        return 2
    facts = ModelFacts(
        model=model,
        served_name=settings["served_name"],
        vocab_size=settings["vocab_size"],
        max_model_len=settings["max_model_len"],
        capacity=settings["capacity"],
        max_waiting=settings["max_waiting"],
    )
    engine = EngineClient(facts, writer)
    protocol = "h11"
    if http_name == "httptools":  # uvicorn's, with h11's bound on a request's head
        from ppruntime.api.http_protocol import BoundedHeadHttpToolsProtocol

        protocol = BoundedHeadHttpToolsProtocol
    app = build_app(engine, tokenizer, template, settings["max_body_bytes"], ServerMetrics())
    config = uvicorn.Config(
        streams_outside(app),
        host=settings["host"],
        port=settings["port"],
        http=protocol,
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,  # both protocols' bound
        proxy_headers=False,  # nothing here reads the client's address
        log_config=None,  # its loggers are set up above, with --log-level and --log-dir
        log_level=None,
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_EXIT_S,
    )
    server = Server(config)

    async def run_server() -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot listen
            await server.serve()

    serving = asyncio.create_task(run_server())
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if not server.started:
        host, port = settings["host"], settings["port"]
        await say(["failed", f"could not listen on {host}:{port} (is the port in use?)"])
        return 2
    await say(["listening", server.servers[0].sockets[0].getsockname()[1]])
    await engine.read_from(reader)  # until the engine process closes the link
    server.should_exit = True
    await serving
    return 0


if __name__ == "__main__":
    sys.exit(main())
