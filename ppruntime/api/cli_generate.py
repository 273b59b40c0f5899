"""`ppruntime generate`: generate from the command line, under mpirun or alone.

Every rank parses the same arguments. Rank 0 reads and validates the prompts
(file lines, flag values, the files it will write), every rank checks its own
settings (log directory, thread count), and all agree on the verdict, so bad input
ends every rank with status 2 before anything is loaded or generated. With
`--json`, stdout carries exactly one JSON object per request, in input order;
logs go to stderr. With `--output FILE`, each request is also appended to FILE as
it finishes (see `results_file`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from ppruntime.api.results_file import ResultsFile
from ppruntime.config import ACTIVATION_CHANNELS
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.sampling_params import SamplingParams, check_unicode

EXIT_REQUEST_FAILED = 1  # a request ended with finish_reason "error" (the others are fine)
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped early, running requests were aborted
PROMPT_FIELDS = ("prompt", "prompt_token_ids")


class CliInputError(ValueError):
    pass


@dataclass
class PromptSpec:
    source: str  # "--prompt 2" or "prompts.jsonl:7"
    prompt: object  # str or list[int]


def add_generate_parser(sub, add_common) -> None:
    parser = sub.add_parser("generate", help="generate text for prompts")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="Hugging Face checkpoint directory")
    model.add_argument(
        "--preset",
        help="built-in model: tiny-trained (default; reads as words), tiny (random weights, "
        "what the tests use), bench-small, null",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts-file",
        help='JSON lines, each {"prompt": "..."} or {"prompt_token_ids": [...]}',
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=16)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument(
        "--stop-token-ids", default="", help="comma-separated token ids that end a request"
    )
    sampling.add_argument("--ignore-eos", action="store_true")
    sampling.add_argument("--logprobs", type=int, default=None, help="top-n log-probs per token")
    add_engine_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print text as it is generated")
    output.add_argument("--json", action="store_true", help="one JSON object per request")
    output.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="append each request to FILE as one JSON line as it finishes; rewritten in "
        "input order at the end",
    )
    output.add_argument("--trace", default=None, help="write a Chrome trace of all ranks here")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(parser)
    parser.set_defaults(run=run_generate)


def add_engine_arguments(parser) -> None:
    """The engine flags `generate` and `serve` share."""
    engine = parser.add_argument_group("engine")
    engine.add_argument("--pp-size", type=int, default=None, help="default: the MPI world size")
    engine.add_argument(
        "--layer-partition",
        default=None,
        help="layers per stage, e.g. 3,5,5,3, or auto (balanced by measured time)",
    )
    add_partition_cost_arguments(engine)
    engine.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    engine.add_argument("--device", default=None, help="cpu, cuda (default: GPU per local rank)")
    engine.add_argument("--max-batch-size", type=int, default=64)
    engine.add_argument("--max-num-tokens", type=int, default=1024)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--block-size", type=int, default=16)
    engine.add_argument("--kv-cache-blocks", type=int, default=None)
    engine.add_argument("--deterministic", action="store_true", default=None)
    engine.add_argument("--num-microbatches", type=int, default=None)
    engine.add_argument(
        "--watchdog-timeout",
        type=float,
        default=None,
        help="seconds without progress before the job aborts (default 300; must be > 0)",
    )
    engine.add_argument(
        "--startup-timeout",
        type=float,
        default=None,
        help="seconds every rank may take to start up, loading included (default 600)",
    )
    engine.add_argument("--engine-seed", type=int, default=0)
    engine.add_argument(
        "--attention-backend",
        default=None,
        help="torch, triton (default: $PPRUNTIME_ATTENTION_BACKEND, else triton on CUDA, "
        "torch on CPU)",
    )
    engine.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run every decode step eagerly (graphs are on by default on CUDA)",
    )
    engine.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with one stage, schedule the next decode step while the device runs the "
        "current one (default: $PPRUNTIME_ASYNC_SCHEDULING, else on for CUDA at --pp-size 1 "
        "outside --deterministic)",
    )
    engine.add_argument(
        "--activation-channel",
        default=None,
        choices=ACTIVATION_CHANNELS,
        help="how activations reach the next stage (default: "
        "$PPRUNTIME_ACTIVATION_CHANNEL, else auto: nccl between distinct GPUs, host otherwise)",
    )


def add_partition_cost_arguments(group) -> None:
    group.add_argument(
        "--partition-costs",
        default=None,
        metavar="FILE",
        help="with --layer-partition auto: reuse these measured costs "
        "(written by `ppruntime info --model DIR --partition-costs FILE`)",
    )
    group.add_argument(
        "--partition-decode-fraction",
        type=float,
        default=0.9,
        help="with --layer-partition auto: expected share of decode microbatches",
    )
    group.add_argument(
        "--partition-decode-context",
        type=int,
        default=256,
        help="with --layer-partition auto: context length of the timed decode microbatch",
    )


def llm_from_args(args: argparse.Namespace):
    """The engine the shared flags describe (collective: every rank calls it)."""
    from ppruntime.api.llm import LLM

    return LLM(
        args.model,
        preset=args.preset,
        pp_size=args.pp_size,
        layer_partition=args.layer_partition,
        partition_costs=args.partition_costs,
        partition_decode_fraction=args.partition_decode_fraction,
        partition_decode_context=args.partition_decode_context,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        block_size=args.block_size,
        kv_cache_blocks=args.kv_cache_blocks,
        max_model_len=args.max_model_len,
        deterministic=args.deterministic,
        num_microbatches=args.num_microbatches,
        seed=args.engine_seed,
        attention_backend=args.attention_backend,
        cuda_graphs=not args.enforce_eager,
        async_scheduling=args.async_scheduling,
        activation_channel=args.activation_channel,
        watchdog_timeout_s=args.watchdog_timeout,
        startup_timeout_s=args.startup_timeout,
        trace=args.trace,
        log_level=args.log_level,
        log_dir=args.log_dir,
        exit_workers=False,
    )


def start_engine(args: argparse.Namespace, info, command: str):
    """`llm_from_args`, or None after printing (rank 0) a start-up error to stderr."""
    from ppruntime.comm.mpi_env import MPIConfigurationError
    from ppruntime.config import ConfigError
    from ppruntime.engine.engine import StartupError
    from ppruntime.model import ModelLoadError, PartitionError

    try:
        return llm_from_args(args)
    except (
        ConfigError,
        MPIConfigurationError,  # e.g. --pp-size differs from the rank count: same on every rank
        ModelLoadError,
        PartitionError,
        StartupError,
        ValueError,
    ) as exc:
        if info.rank == 0:
            print(f"ppruntime {command}: error: {exc}", file=sys.stderr)
        return None


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    try:
        stop_ids = [int(t) for t in args.stop_token_ids.split(",") if t.strip()]
    except ValueError:
        raise InvalidRequestError(
            f"--stop-token-ids must be comma-separated integers, got {args.stop_token_ids!r}"
        ) from None
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=stop_ids,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def read_prompts(args: argparse.Namespace) -> list[PromptSpec]:
    prompts = []
    for i, text in enumerate(args.prompt):
        prompts.append(PromptSpec(f"--prompt #{i + 1}", _checked_text(f"--prompt #{i + 1}", text)))
    if args.prompts_file:
        prompts.extend(read_prompts_file(args.prompts_file))
    if not prompts:
        raise CliInputError("no prompts: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _checked_text(where: str, text: str) -> str:
    try:
        check_unicode("the prompt", text)
    except InvalidRequestError as error:
        raise CliInputError(f"{where}: {error}") from None
    return text


def read_prompts_file(path: str) -> list[PromptSpec]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CliInputError(f"--prompts-file {path}: {error.strerror}") from None
    prompts = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise CliInputError(
                f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                f"{error.start + 1})"
            ) from None
        if not line.strip():
            continue
        prompts.append(PromptSpec(where, _parse_prompt_line(where, line)))
    return prompts


def _parse_prompt_line(where: str, line: str) -> str | list[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CliInputError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise CliInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has_text, has_ids = "prompt" in record, "prompt_token_ids" in record
    if has_text == has_ids:
        raise CliInputError(
            f"{where}: give exactly one of the fields 'prompt' or 'prompt_token_ids'"
        )
    unknown = [key for key in record if key not in PROMPT_FIELDS]
    if unknown:
        raise CliInputError(
            f"{where}: unknown field {unknown[0]!r}; a line holds only 'prompt' or "
            "'prompt_token_ids'"
        )
    if has_text:
        value = record["prompt"]
        if not isinstance(value, str) or not value:
            raise CliInputError(f"{where}: field 'prompt' must be a non-empty string")
        return _checked_text(where, value)
    value = record["prompt_token_ids"]
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise CliInputError(f"{where}: field 'prompt_token_ids' must be a list of integers")
    return value


def agree_on_error(error: str | None, info) -> str | None:
    """The first rank's error (rank 0 checks the input, each rank its own settings),
    known to every rank."""
    if info.size == 1:
        return error
    from mpi4py import MPI

    errors = MPI.COMM_WORLD.allgather(error)
    for rank, text in enumerate(errors):
        if text is not None:
            return text if rank == 0 else f"rank {rank}: {text}"
    return None


def _check_input(args: argparse.Namespace) -> tuple[SamplingParams, list[PromptSpec]]:
    """Rank 0: everything about the input that can be known before loading."""
    from ppruntime.config import check_writable_file

    params = sampling_params_from_args(args)
    prompts = read_prompts(args)
    for flag, path in (("--output", args.output), ("--trace", args.trace)):
        if path is not None:
            check_writable_file(path, flag)
    return params, prompts


def _check_argv(args: argparse.Namespace) -> None:
    """The part of `_check_input` that argv alone decides, in the same order: every
    rank reaches the same verdict without MPI."""
    sampling_params_from_args(args)
    for i, text in enumerate(args.prompt):
        _checked_text(f"--prompt #{i + 1}", text)
    if not args.prompt and not args.prompts_file:
        raise CliInputError("no prompts: give --prompt TEXT or --prompts-file FILE")


def run_generate(args: argparse.Namespace) -> int:
    from ppruntime.api.early_errors import bootstrap_would_pass, report_early
    from ppruntime.comm.launcher import started_alone
    from ppruntime.config import ConfigError

    checked = None  # rank 0's (params, prompts) when already checked before MPI
    if bootstrap_would_pass(args.log_level, args.log_dir):
        try:
            if started_alone():  # no other rank to agree with: check the files too
                checked = _check_input(args)
            else:
                _check_argv(args)
        except (InvalidRequestError, CliInputError, ConfigError) as exc:
            return report_early("generate", str(exc))

    from ppruntime.bootstrap import bootstrap
    from ppruntime.comm.mpi_env import init_mpi

    error = None
    try:
        info = bootstrap(args.log_level, args.log_dir)
    except ConfigError as exc:  # MPI is up: agree with the others, then end
        info = init_mpi()
        error = str(exc)
    prompts: list[PromptSpec] = []
    params = None
    if info.rank == 0 and error is None:
        try:
            params, prompts = checked or _check_input(args)
        except (InvalidRequestError, CliInputError, ConfigError) as exc:
            error = str(exc)
    error = agree_on_error(error, info)
    if error is not None:
        if info.rank == 0:
            print(f"ppruntime generate: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    llm = start_engine(args, info, "generate")
    if llm is None:
        return EXIT_BAD_INPUT
    if not llm.is_driver:
        return 0
    with llm:
        try:
            encoded = [_encode(llm, spec, params) for spec in prompts]
        except CliInputError as exc:
            print(f"ppruntime generate: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        results = ResultsFile(args.output) if args.output else None
        outputs = _generate(llm, encoded, params, args, results)
        for spec, output in zip(prompts, outputs):
            if output is None:  # never submitted: SIGTERM came first
                continue
            if args.json:
                print(json.dumps(output.to_json()), flush=True)
            elif not args.stream:
                print(f"[{spec.source}] {output.text}", flush=True)
        if results is not None:
            results.finalize([(i, output) for i, output in enumerate(outputs) if output])
    from ppruntime.comm.failure import termination_requested

    failed = False
    for spec, output in zip(prompts, outputs):
        if output is not None and output.finish_reason == "error":
            failed = True
            print(f"ppruntime generate: error: {spec.source}: {output.error}", file=sys.stderr)
    if termination_requested.is_set():
        return EXIT_TERMINATED
    return EXIT_REQUEST_FAILED if failed else 0


def _encode(llm, spec: PromptSpec, params: SamplingParams):
    try:
        ids = llm.encode_prompt(spec.prompt)
        llm.validate_request(ids, params)
    except (InvalidRequestError, ValueError) as exc:
        raise CliInputError(f"{spec.source}: {exc}") from None
    return ids


def _generate(llm, encoded, params, args, results: ResultsFile | None) -> list:
    """Run every request; return the final outputs in input order (None for a request
    never submitted), printing streamed text and appending to `results` on the way."""
    from ppruntime.api.progress import ProgressBar
    from ppruntime.comm.failure import termination_requested

    index_of: dict[str, int] = {}
    for index, prompt_ids in enumerate(encoded):
        try:
            request_id = llm.add_request(prompt_ids, params, stream=args.stream)
        except RuntimeError:
            if termination_requested.is_set():  # SIGTERM: no new requests
                break
            raise
        index_of[request_id] = index
    outputs: list = [None] * len(encoded)
    print_stream = args.stream and not args.json
    single = len(encoded) == 1
    progress = ProgressBar(len(index_of), enabled=False if args.quiet or args.stream else None)
    remaining = len(index_of)
    while remaining:
        finished, deltas = llm.step()
        if print_stream:
            for delta in deltas:
                if delta.text:
                    prefix = "" if single else f"[{delta.request_id}] "
                    sys.stdout.write(prefix + delta.text + ("" if single else "\n"))
                    sys.stdout.flush()
        for output in finished:
            index = index_of[output.request_id]
            outputs[index] = output
            remaining -= 1
            progress.advance()
            if results is not None:
                results.append(index, output)
    progress.close()
    if print_stream and single:
        sys.stdout.write("\n")
    return outputs
