"""`ppruntime generate` (filled in by the engine work)."""

from __future__ import annotations


def add_generate_parser(sub, add_common) -> None:
    parser = sub.add_parser("generate", help="generate text")
    add_common(parser)
    parser.set_defaults(run=lambda args: 2)
