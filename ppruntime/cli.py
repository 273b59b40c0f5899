"""The `ppruntime` command: info, generate, serve, bench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-dir", default=None, help="also write one log file per rank here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppruntime", description="Pipeline-parallel LLM inference on MPI"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show MPI, thread level, hosts and devices of this job")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    from ppruntime.api.cli_partition import add_partition_dry_run_arguments

    add_partition_dry_run_arguments(info)
    _add_common_options(info)
    from ppruntime.api.cli_generate import add_generate_parser

    add_generate_parser(sub, _add_common_options)
    from ppruntime.api.cli_serve import add_serve_parser

    add_serve_parser(sub, _add_common_options)
    try:
        from ppruntime.api.cli_bench import add_bench_parser
    except ImportError:  # benchmarks are optional
        pass
    else:
        add_bench_parser(sub, _add_common_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return run_info(args)
    return args.run(args)


def run_info(args: argparse.Namespace) -> int:
    from ppruntime.api.cli_generate import EXIT_BAD_INPUT, agree_on_error
    from ppruntime.bootstrap import bootstrap
    from ppruntime.comm.mpi_env import init_mpi
    from ppruntime.config import ConfigError
    from ppruntime.info import format_job_info, gather_job_info

    error = None
    try:
        info = bootstrap(args.log_level, args.log_dir)
    except ConfigError as exc:
        info = init_mpi()
        error = str(exc)
    error = agree_on_error(error, info)
    if error is not None:
        if info.rank == 0:
            print(f"ppruntime info: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.model or args.preset:
        from ppruntime.api.cli_partition import run_partition_dry_run

        status = run_partition_dry_run(args, info)
        sys.stdout.flush()
        return status
    ranks = gather_job_info(info)
    if info.rank == 0:
        assert ranks is not None
        print(format_job_info(info, ranks, as_json=args.json), flush=True)
    sys.stdout.flush()
    return 0
