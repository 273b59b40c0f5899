"""The Python API: `LLM` and its `generate`, streaming, `abort` and `shutdown`.

Under `mpirun -n N python script.py` every rank runs the script. `LLM(...)` is
collective: each rank loads its own pipeline stage. On rank 0 the constructor
returns and the script goes on to call `generate`; on every other rank the
constructor serves the pipeline until rank 0 shuts it down (`llm.shutdown()`, the
end of a `with` block, or the end of the script) and then ends the process, so
code after `LLM(...)` runs on rank 0 only. Pass `exit_workers=False` to get the
object back on the other ranks instead (`llm.is_driver` is then False).
Without mpirun, one process runs the whole model (pp_size=1).
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ppruntime.api.progress import ProgressBar
from ppruntime.api.request_checks import encode_prompt, validate_request
from ppruntime.bootstrap import bootstrap
from ppruntime.comm.failure import format_exception, report_and_abort
from ppruntime.config import (
    AUTO_PARTITION,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_WATCHDOG_TIMEOUT_S,
    ConfigError,
    EngineConfig,
    ParallelConfig,
    check_writable_file,
    env_flag,
)
from ppruntime.engine.engine import PipelineEngine, RankReport
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.outputs import RequestOutput
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.trace import write_chrome_trace
from ppruntime.model import DEFAULT_PRESET, is_preset, parse_layer_partition, preset_names

Prompt = str | Sequence[int] | np.ndarray


class _Inbox:
    """Outputs waiting for the one call that takes them."""

    def __init__(self) -> None:
        self.finished: list[RequestOutput] = []
        self.events: list[RequestOutput] = []


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        preset: str | None = None,
        pp_size: int | None = None,
        layer_partition: str | Sequence[int] | None = None,
        partition_costs: str | None = None,
        partition_decode_fraction: float = 0.9,
        partition_decode_context: int = 256,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int = 64,
        max_num_tokens: int = 1024,
        block_size: int = 16,
        kv_cache_blocks: int | None = None,
        kv_cache_memory_mb: int = 256,
        max_model_len: int | None = None,
        deterministic: bool | None = None,
        num_microbatches: int | None = None,
        seed: int = 0,
        attention_backend: str | None = None,
        cuda_graphs: bool = True,
        async_scheduling: bool | None = None,
        activation_channel: str | None = None,
        watchdog_timeout_s: float | None = None,
        startup_timeout_s: float | None = None,
        trace: str | None = None,
        log_level: str | None = None,
        log_dir: str | None = None,
        exit_workers: bool = True,
    ) -> None:
        if model is not None and preset is not None:
            raise ValueError("give either model=DIR or preset=NAME, not both")
        if preset is not None and not is_preset(preset):
            # without this, an unknown preset name is taken for a (missing) directory
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        source = model if model is not None else (preset or DEFAULT_PRESET)
        self.info = bootstrap(log_level, log_dir)
        if deterministic is None:
            deterministic = bool(env_flag("PPRUNTIME_DETERMINISTIC"))
        if async_scheduling is None:
            async_scheduling = env_flag("PPRUNTIME_ASYNC_SCHEDULING")
        if attention_backend is None:
            attention_backend = os.environ.get("PPRUNTIME_ATTENTION_BACKEND") or None
        if activation_channel is None:
            activation_channel = os.environ.get("PPRUNTIME_ACTIVATION_CHANNEL") or "auto"
        if isinstance(layer_partition, str) and layer_partition != AUTO_PARTITION:
            layer_partition = parse_layer_partition(layer_partition)
        parallel = ParallelConfig(
            pp_size=self.info.size if pp_size is None else pp_size,
            layer_partition=(
                layer_partition
                if layer_partition is None or layer_partition == AUTO_PARTITION
                else tuple(layer_partition)
            ),
            partition_costs=partition_costs,
            partition_decode_fraction=partition_decode_fraction,
            partition_decode_context=partition_decode_context,
            deterministic=deterministic,
            num_microbatches=num_microbatches,
            watchdog_timeout_s=(
                DEFAULT_WATCHDOG_TIMEOUT_S if watchdog_timeout_s is None else watchdog_timeout_s
            ),
        )
        self.config = EngineConfig(
            model=str(source),
            parallel=parallel,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            block_size=block_size,
            kv_cache_blocks=kv_cache_blocks,
            kv_cache_memory_mb=kv_cache_memory_mb,
            max_model_len=max_model_len,
            seed=seed,
            attention_backend=attention_backend,
            startup_timeout_s=(
                DEFAULT_STARTUP_TIMEOUT_S if startup_timeout_s is None else startup_timeout_s
            ),
            cuda_graphs=cuda_graphs,
            async_scheduling=async_scheduling,
            activation_channel=activation_channel,
        )
        self.trace_path = trace
        self._check_trace_path(trace)
        self.reports: list[RankReport] | None = None
        self._engine = PipelineEngine(self.config, self.info, trace=trace is not None)
        self._executor = self._engine.executor
        self._request_counter = itertools.count()
        # Every output goes to exactly one consumer: requests submitted by generate or
        # generate_stream are claimed by that call's inbox, all others go to step()'s.
        self._claims: dict[str, _Inbox] = {}
        self._step_inbox = _Inbox()
        self._closed = False
        if not self.is_driver:
            try:
                self._engine.serve()
            except Exception as exc:
                # The pipeline cannot go on without this rank. End the job here, with
                # the traceback: a caller catching ValueError around LLM(...) (as the
                # CLI does for start-up errors) must not swallow it on this rank.
                report_and_abort(
                    self.info,
                    f"unhandled exception on rank {self.info.rank} while serving the "
                    f"pipeline:\n{format_exception(exc)}",
                )
            self._close()
            if exit_workers:
                sys.stdout.flush()
                sys.exit(0)
            return
        atexit.register(self.shutdown)

    def _check_trace_path(self, trace: str | None) -> None:
        """The trace is written at shutdown, after all the work: check the path now.

        Rank 0 writes it, so rank 0 checks, and every rank learns the verdict (each
        takes part whatever its own `trace` argument, so no rank waits alone)."""
        error = None
        if self.is_driver and trace is not None:
            try:
                check_writable_file(trace, "trace")
            except ConfigError as exc:
                error = str(exc)
        if self.info.size > 1:
            from mpi4py import MPI

            error = MPI.COMM_WORLD.bcast(error, root=0)
        if error is not None:
            raise ConfigError(error)

    # -- properties ------------------------------------------------------------------
    @property
    def is_driver(self) -> bool:
        return self.info.rank == 0

    @property
    def tracer(self):
        """Rank 0's span timer (engine/trace.py): the serving loop times its own parts."""
        return self._engine.tracer

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.model_config.vocab_size

    @property
    def model_config(self):
        return self._engine.model_config

    # -- requests --------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> np.ndarray:
        """Text or token ids -> validated contiguous int32 token ids (converted once)."""
        return encode_prompt(
            prompt, self.tokenizer, self.config.model, self.vocab_size, self.max_model_len
        )

    def validate_request(self, prompt_ids: np.ndarray, params: SamplingParams) -> None:
        validate_request(
            prompt_ids, params, self.vocab_size, self.max_model_len, self.tokenizer is not None
        )

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queue one request (validated here, on rank 0); returns its id."""
        self._require_driver("add_request")
        if not isinstance(stream, (bool, np.bool_)):
            raise InvalidRequestError(f"stream must be a bool, got {stream!r}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise InvalidRequestError(f"request_id must be a non-empty str, got {request_id!r}")
        params = sampling_params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.validate_request(prompt_ids, params)
        request_id = request_id if request_id is not None else self._new_request_id()
        self._executor.add_request(request_id, prompt_ids, params, stream=bool(stream))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; it finishes with finish_reason="abort" and frees its blocks.

        Returns False when there is nothing to cancel: the id is unknown, the request
        has finished, or it was aborted already.
        """
        self._require_driver("abort")
        return self._executor.abort(request_id)

    def step(self) -> tuple[list[RequestOutput], list[RequestOutput]]:
        """Run one iteration: (finished outputs, streaming deltas).

        Returns the outputs of the requests added with `add_request`, also those that
        finished while `generate` or `generate_stream` ran (those calls keep only
        their own requests' outputs).
        """
        self._require_driver("step")
        self._pump()
        inbox = self._step_inbox
        finished, inbox.finished = inbox.finished, []
        events, inbox.events = inbox.events, []
        return finished, events

    def _pump(self) -> None:
        """One engine iteration; its outputs go to the inboxes that claim them."""
        executor = self._executor
        executor.step()
        with self._engine.tracer.span("outputs"):
            claims, unclaimed = self._claims, self._step_inbox
            for delta in executor.take_events():
                claims.get(delta.request_id, unclaimed).events.append(delta)
            for output in executor.take_finished():  # after the deltas: the claim ends here
                claims.pop(output.request_id, unclaimed).finished.append(output)

    def _claim(self, request_ids: list[str]) -> _Inbox:
        inbox = _Inbox()
        for request_id in request_ids:
            self._claims[request_id] = inbox
        return inbox

    def _release(self, inbox: _Inbox, request_ids: set[str]) -> None:
        """A call that claimed `request_ids` ends before they all finished (an exception,
        a stream closed early): the outputs of theirs it did not take, and those still
        to come, go to step()."""
        for request_id in request_ids:
            if self._claims.get(request_id) is inbox:
                del self._claims[request_id]
        unclaimed = self._step_inbox
        unclaimed.events.extend(d for d in inbox.events if d.request_id in request_ids)
        unclaimed.finished.extend(o for o in inbox.finished if o.request_id in request_ids)
        inbox.finished, inbox.events = [], []

    def _new_request_id(self) -> str:
        while True:
            request_id = f"req-{next(self._request_counter)}"
            if not self._executor.has_request(request_id):  # a caller may have chosen it
                return request_id

    def has_unfinished(self) -> bool:
        """Whether any request added on rank 0 has not finished yet."""
        return self._executor.has_unfinished()

    def engine_state(self) -> dict:
        """Rank 0's live view: requests running and waiting, KV blocks, forward time (rank 0's
        and, as last reported, every other rank's)."""
        executor = self._executor
        blocks = executor.table.blocks
        return {
            "running": executor.table.num_active,
            "waiting": len(executor.scheduler.waiting),
            "kv_blocks_used": blocks.num_blocks - blocks.num_free_blocks,
            "kv_blocks_total": blocks.num_blocks,
            "busy_s": self._engine.tracer.busy_s.get("forward", 0.0),
            # every rank's latest BusyReport (ranks > 0: sent about once a second)
            "rank_busy": self._engine.rank_stats.latest(),
        }

    # -- batch API -------------------------------------------------------------------
    def _submit_all(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        stream: bool,
    ) -> list[str]:
        self._require_driver("generate")
        if isinstance(prompts, (str, np.ndarray)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(prompts)} prompts but {len(params_list)} sampling params"
                )
        encoded = []
        for index, (prompt, params) in enumerate(zip(prompts, params_list)):
            try:
                prompt_ids = self.encode_prompt(prompt)
                self.validate_request(prompt_ids, params)
            except InvalidRequestError as error:
                raise InvalidRequestError(f"prompt {index}: {error}") from None
            encoded.append((prompt_ids, params))
        ids = []
        for prompt_ids, params in encoded:
            request_id = self._new_request_id()
            self._executor.add_request(request_id, prompt_ids, params, stream=stream)
            ids.append(request_id)
        return ids

    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order.

        Requests added with `add_request` go on meanwhile; their outputs are left for
        `step()`.
        """
        ids = self._submit_all(prompts, sampling_params, stream=False)
        inbox = self._claim(ids)
        results: dict[str, RequestOutput] = {}
        progress = ProgressBar(len(ids), enabled=use_tqdm)
        try:
            while len(results) < len(ids):
                self._pump()
                for output in inbox.finished:
                    results[output.request_id] = output
                    progress.advance()
                inbox.finished.clear()
        except BaseException:
            self._release(inbox, set(ids) - results.keys())
            raise
        finally:
            progress.close()
        return [results[request_id] for request_id in ids]

    def generate_stream(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield per-step deltas (new tokens and text) as they are produced.

        The deltas of a request concatenate to its final output; its last delta has
        `finished=True` and the `finish_reason`. Other requests' outputs are left for
        `step()`, also when the caller stops iterating early (its own requests then
        go on, and their outputs too are left for `step()`).
        """
        ids = self._submit_all(prompts, sampling_params, stream=True)
        inbox = self._claim(ids)
        remaining = set(ids)  # requests whose last delta was not given yet
        pending: list[RequestOutput] = []  # deltas of this iteration; pending[:given] given
        given = 0
        try:
            while remaining:
                self._pump()
                # the final outputs of its requests: their deltas carry them
                inbox.finished = [o for o in inbox.finished if o.request_id in remaining]
                pending, inbox.events, given = inbox.events, [], 0
                for delta in pending:
                    given += 1
                    if delta.finished:
                        remaining.discard(delta.request_id)
                    yield delta
        finally:
            if remaining:  # closed early, or an exception
                inbox.events[:0] = pending[given:]
                self._release(inbox, remaining)

    # -- lifecycle -------------------------------------------------------------------
    def shutdown(self) -> list[RankReport] | None:
        """Stop every rank (requests still running finish with "abort")."""
        if self._closed:
            return self.reports
        if self.is_driver and self._executor.failure is not None:
            self._stop_after_failure()
            raise RuntimeError(
                "this LLM cannot be shut down in order: its engine failed earlier "
                f"({self._executor.failure!r})"
            ) from self._executor.failure
        if self.is_driver:
            self._executor.shutdown()
        self._close()
        return self.reports

    def _close(self) -> None:
        self._closed = True
        self.reports = self._engine.finalize()
        if self.is_driver and self.trace_path and self.reports:
            write_chrome_trace(
                self.trace_path, [report.events for report in self.reports], origin=0.0
            )
        if self.is_driver:
            atexit.unregister(self.shutdown)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.is_driver and self._executor.failure is not None:
            self._stop_after_failure()
            return  # the engine's own exception goes on
        self.shutdown()

    def _stop_after_failure(self) -> None:
        """Rank 0's executor failed: the other ranks cannot be stopped in order.

        With other ranks, abort the job (naming this rank, with the traceback) rather
        than leave them waiting; alone, just mark this LLM closed.
        """
        failure = self._executor.failure
        self._closed = True
        atexit.unregister(self.shutdown)
        if self.info.size > 1:
            report_and_abort(
                self.info,
                f"the engine failed on rank {self.info.rank}; aborting the job:\n"
                + format_exception(failure),
            )

    def _require_driver(self, what: str) -> None:
        if not self.is_driver:
            raise RuntimeError(f"{what}() runs on rank 0 only; this is rank {self.info.rank}")
        if self._closed:
            raise RuntimeError(f"{what}(): this LLM has been shut down")
