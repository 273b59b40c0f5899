"""Builds everything one rank needs for one model, and takes it down again.

Every rank calls `PipelineEngine(config, rank_info)` (SPMD). Start-up is collective:
the communicators are duplicated here, in the main thread; each rank loads only its
own stage; KV capacity is agreed as the minimum over ranks; and if any rank fails
to start, every rank raises the same error naming that rank (no rank is left
waiting for a peer that died during loading). Every start-up exchange gives up at
`config.startup_timeout_s` after this rank began (comm.bounded): a rank that is
stopped, stuck or too slow is named and the job aborts, as no rank can go on
without it and a stopped process would keep mpirun waiting forever.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.bounded import RanksMissing, allgather_within, describe_ranks, gather_within
from ppruntime.comm.channels import RankDevice, choose_channel, make_channel
from ppruntime.comm.channels.process_group import (
    destroy_process_group,
    init_process_group_from_mpi,
)
from ppruntime.comm.communicators import PipelineComms
from ppruntime.comm.failure import report_and_abort
from ppruntime.comm.mpi_env import (
    RankInfo,
    check_world_size,
    cuda_aware_mpi,
    require_thread_multiple,
)
from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import WaitTracker, sleep_counts
from ppruntime.config import AUTO_PARTITION, ConfigError, EngineConfig, env_flag
from ppruntime.device import available_memory_bytes, configure_determinism, select_device
from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.executor import PipelineExecutor
from ppruntime.engine.last_stage import LastStage
from ppruntime.engine.partition_costs import (
    describe_partition,
    measure_costs_for,
    probe_key,
    probe_turns,
    read_partition_costs,
)
from ppruntime.engine.rank_stats import RankStatsExchange
from ppruntime.engine.relay import ResponseRelay
from ppruntime.engine.seq_table import SequenceTable
from ppruntime.engine.trace import Tracer
from ppruntime.engine.watchdog import Watchdog, reply_window
from ppruntime.logs import get_logger
from ppruntime.model import (
    ModelConfig,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
    load_config,
    load_stage_model,
    load_tokenizer,
    partition_layers,
    resolve_dtype,
    select_attention_backend,
    select_layer_ops,
    stage_extra_costs,
)
from ppruntime.model.partition import CostBalancedPartition, StageSpec, balance_by_cost
from ppruntime.stage.debug_knobs import StageKnobs
from ppruntime.stage.device_spans import make_device_spans
from ppruntime.stage.graphs import plan_decode
from ppruntime.stage.null_model import NullStageModel
from ppruntime.stage.runner import StageRunner
from ppruntime.stage.step_inputs import StepInputPool

log = get_logger("engine")

NULL_PRESET = "null"


class StartupError(RuntimeError):
    """A rank could not start; raised on every rank with the failing rank's message."""


@dataclass
class RankReport:
    """What a rank reports at shutdown (gathered on rank 0)."""

    rank: int
    kv_blocks_free: int
    kv_blocks_total: int
    iterations: int
    batches: int
    tokens_computed: int
    busy_s: dict
    step_counters: dict
    block_table_counters: dict
    events: list
    rows_continued: int = 0  # rows scheduled before their previous step landed (async)
    busy_cpu_s: dict = field(default_factory=dict)  # the rank's CPU time in each span
    counters: dict = field(default_factory=dict)  # rank_stats.COUNTERS at shutdown


class PipelineEngine:
    def __init__(self, config: EngineConfig, info: RankInfo, trace: bool = False) -> None:
        parallel = config.parallel
        self.config = config
        self.info = info
        check_world_size(parallel.pp_size, info.size)
        if not parallel.deterministic and info.size > 1:
            require_thread_multiple(info)
        self._startup_deadline = time.monotonic() + config.startup_timeout_s
        try:
            # a rank stopped before it got here would leave the others inside Dup
            allgather_within(
                pkl5.Intracomm(MPI.COMM_WORLD),
                None,
                self._startup_deadline,
                "the start of the engine",
            )
            self.comms = PipelineComms.create(deadline=self._startup_deadline)
        except RanksMissing as missing:
            self._abort_startup(missing)
        try:
            self._check_same_config(config)
            self.auto_partition: CostBalancedPartition | None = None
            if parallel.layer_partition == AUTO_PARTITION:
                self._collectively(
                    lambda: self._choose_probe_key(config, info), "choosing the probe's device"
                )
                turns = probe_turns(self._exchange(self._probe_key, "ordering the cost probes"))
                for turn in range(max(turns) + 1):  # ranks sharing a GPU: one after the other
                    mine = turns[info.rank] == turn
                    self._collectively(
                        (lambda: self._measure_costs(config, info)) if mine else (lambda: None),
                        "measuring the stage costs",
                    )
                measured = self._exchange(self._measured, "gathering the measured costs")
                self._collectively(
                    lambda: self._choose_partition(config, measured), "choosing the partition"
                )
            self._collectively(lambda: self._load_stage(config, info), "loading the stages")
            self.num_blocks = min(
                self._exchange(self._local_blocks, "agreeing on the KV cache size")
            )
            self._start_activation_channel(config, info)
            self._collectively(
                lambda: self._build_executor(config, info, trace), "building the executors"
            )
        except RanksMissing as missing:
            self._abort_startup(missing)
        except BaseException:
            self.comms.free()
            raise
        if info.rank == 0:
            self.tracker.pause()  # rank 0 runs only when its caller steps
        # Everything built so far (torch, the model, the tables) lives as long as the
        # engine: keep it out of the cyclic collector, whose full passes over it took
        # ~50 ms, stalled every rank at once and showed up as pipeline bubbles.
        gc.collect()
        gc.freeze()
        self.executor.start()
        self.watchdog.start()
        log.info(
            "stage %d/%d: layers [%d, %d), %d KV blocks of %d tokens, %s mode, %d microbatch "
            "slots, async scheduling %s",
            self.stage.stage_index,
            self.stage.num_stages,
            self.stage.layer_start,
            self.stage.layer_end,
            self.num_blocks,
            config.block_size,
            "deterministic" if parallel.deterministic else "async",
            parallel.microbatch_slots,
            "on" if self.executor.overlap is not None else "off",
        )

    def _exchange(self, obj: object, what: str) -> list:
        """Every rank's `obj`, by rank; RanksMissing at the start-up deadline."""
        return allgather_within(self.comms.pipeline, obj, self._startup_deadline, what)

    def _abort_startup(self, missing: RanksMissing) -> None:
        """End the whole job: the missing ranks cannot be waited for, nor left behind."""
        timeout_s = self.config.startup_timeout_s
        limit = f"within {timeout_s:g} s (--startup-timeout / LLM(startup_timeout_s=...))"
        if missing.late:  # the others have given up on this rank already
            reason = (
                f"rank {self.info.rank} (this rank) did not finish start-up {limit}: it "
                f"reached {missing.what} only after the limit"
            )
        else:
            reason = (
                f"{describe_ranks(missing.ranks)} did not finish start-up {limit}: rank "
                f"{self.info.rank} waited at {missing.what}"
            )
        report_and_abort(
            self.info,
            f"{reason}; a rank is stopped, stuck, or slower to load than the limit allows "
            f"(raise --startup-timeout for very large models)",
        )

    def _check_same_config(self, config: EngineConfig) -> None:
        """Every rank must run the same configuration (PPRUNTIME_DETERMINISTIC set on
        only some nodes, say, would give them different relay modes and hang them)."""
        configs = self._exchange(repr(config), "the check that every rank has the same flags")
        differing = [rank for rank, text in enumerate(configs) if text != configs[0]]
        if differing:
            raise ConfigError(
                f"ranks {differing} were started with a configuration different from rank "
                f"0's: give every rank the same flags and PPRUNTIME_* environment "
                f"(with Open MPI, export variables with -x NAME); rank 0: {configs[0]}; "
                f"rank {differing[0]}: {configs[differing[0]]}"
            )

    def _collectively(self, step, what: str) -> None:
        """Run `step` on every rank; if it failed anywhere, raise on every rank."""
        error = None
        try:
            step()
        except BaseException as exc:  # even KeyboardInterrupt: the others must hear of it
            error = exc
        errors = self._exchange(None if error is None else f"{type(error).__name__}: {error}", what)
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if not failed:
            return
        if error is not None and len(failed) == len(errors) and len(set(errors)) == 1:
            raise error  # the same error on every rank: report it as it is
        details = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
        raise StartupError(f"pipeline start-up failed: {details}") from error

    def _load_stage(self, config: EngineConfig, info: RankInfo) -> None:
        """Everything a rank can do alone: config, partition, its stage's weights."""
        parallel = config.parallel
        model_config: ModelConfig = load_config(config.model)
        self.model_config = model_config
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings,
            model_config.max_position_embeddings,
        )
        if config.max_model_len and config.max_model_len > model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={model_config.max_position_embeddings}"
            )
        first_cost, last_cost = stage_extra_costs(model_config)
        counts = parallel.layer_partition
        if self.auto_partition is not None:
            counts = self.auto_partition.counts
        stages = partition_layers(
            model_config.num_hidden_layers,
            parallel.pp_size,
            counts,
            first_stage_extra_cost=first_cost,
            last_stage_extra_cost=last_cost,
        )
        self.stages = stages
        stage: StageSpec = stages[info.rank]
        self.stage = stage
        device = select_device(info.local_rank, config.device)
        self.device = device
        configure_determinism(device, parallel.deterministic)
        dtype = resolve_dtype(config.dtype, model_config)
        self.tokenizer = load_tokenizer(config.model)
        if config.model == NULL_PRESET:
            model = NullStageModel(
                model_config, stage, config.max_num_tokens, config.max_batch_size
            )
            dtype = torch.float32
        else:
            backend = select_attention_backend(config.attention_backend, device)
            layer_ops = select_layer_ops(config.attention_backend, device)
            log.info("attention backend: %s, layer ops: %s", backend.name, layer_ops.describe())
            model = load_stage_model(
                config.model, stage, dtype, device, backend, layer_ops=layer_ops
            )
        self.activation_dtype = dtype
        self.model = model
        bytes_per_block = kv_cache_bytes_per_block(model_config, stage, config.block_size, dtype)
        self._bytes_per_block = bytes_per_block
        if config.kv_cache_blocks is not None:
            self._local_blocks = config.kv_cache_blocks
        else:
            # what the memory budget allows, but no more than every slot can use
            max_useful = self._max_slots(config) * math.ceil(self.max_model_len / config.block_size)
            budget = config.kv_cache_memory_mb * 2**20 // max(bytes_per_block, 1)
            self._local_blocks = max(1, min(budget, max_useful))

    def _start_activation_channel(self, config: EngineConfig, info: RankInfo) -> None:
        """Choose the activation channel (the same on every rank, from what every rank
        computes on) and join the torch.distributed group it may need."""
        device = self.device
        mine = RankDevice(
            rank=info.rank,
            host=info.host,
            device_type=device.type,
            device_id=str(device.index if device.index is not None else 0),
            cuda_aware_mpi=cuda_aware_mpi() if device.type == "cuda" else "no",
        )
        ranks = self._exchange(mine, "choosing the activation channel")
        self.rank_devices: list[RankDevice] = ranks  # which ranks share a device (benchmarks)
        chosen: list[str] = []
        self._collectively(
            lambda: chosen.append(choose_channel(config.activation_channel, ranks)),
            "choosing the activation channel",
        )
        self.activation_channel = chosen[0] if info.size > 1 else "host"
        self._process_group = self.activation_channel in ("gloo", "nccl")
        if info.rank == 0 and info.size > 1:
            log.info(
                "activation channel: %s (requested %s)",
                self.activation_channel,
                config.activation_channel,
            )
        if self._process_group:
            self._collectively(
                lambda: init_process_group_from_mpi(
                    self.comms.pipeline, self.activation_channel, config.startup_timeout_s
                ),
                f"joining the {self.activation_channel} process group",
            )

    def _choose_probe_key(self, config: EngineConfig, info: RankInfo) -> None:
        self._probe_key = None
        if config.parallel.partition_costs is None:
            device = select_device(info.local_rank, config.device)
            self._probe_key = probe_key(device, info.host)

    def _measure_costs(self, config: EngineConfig, info: RankInfo) -> None:
        """`--layer-partition auto`: this rank's costs (measured, or from the costs file)."""
        parallel = config.parallel
        if parallel.partition_costs is not None:
            self._measured = None  # every rank reads the same file in _choose_partition
            return
        model_config = load_config(config.model)
        device = select_device(info.local_rank, config.device)
        self._measured = measure_costs_for(config, model_config, device, info.rank)

    def _choose_partition(self, config: EngineConfig, measured: list) -> None:
        parallel = config.parallel
        model_config = load_config(config.model)
        if parallel.partition_costs is not None:
            costs, sizes = read_partition_costs(parallel.partition_costs, parallel.pp_size)
        else:
            costs, sizes = [entry[0] for entry in measured], measured[0][1]
        self.auto_partition = balance_by_cost(model_config.num_hidden_layers, costs, sizes)
        self.partition_costs = (costs, sizes)
        if self.info.rank == 0:
            log.info("layer partition auto: %s", describe_partition(self.auto_partition))

    @staticmethod
    def _max_slots(config: EngineConfig) -> int:
        parallel = config.parallel
        return config.max_batch_size * max(parallel.microbatch_slots, parallel.pp_size)

    def _build_executor(self, config: EngineConfig, info: RankInfo, trace: bool) -> None:
        """With the agreed KV capacity: cache, tables, step inputs, relay, executor."""
        parallel = config.parallel
        model_config, stage, dtype = self.model_config, self.stage, self.activation_dtype
        model, device = self.model, self.device
        block_size = config.block_size
        max_blocks_per_seq = math.ceil(self.max_model_len / block_size)
        if self.num_blocks < max_blocks_per_seq:
            raise ConfigError(
                f"a KV cache of {self.num_blocks} blocks x {block_size} tokens cannot hold one "
                f"request of max_model_len={self.max_model_len} ({max_blocks_per_seq} blocks): "
                f"raise --kv-cache-blocks to at least {max_blocks_per_seq} or lower --max-model-len"
            )
        kv_cache = self._allocate_kv_cache()
        max_slots = self._max_slots(config)
        table = SequenceTable(
            max_slots,
            max_blocks_per_seq,
            BlockManager(self.num_blocks, block_size),
            token_table_len=self.max_model_len if stage.is_first_stage else None,
            max_model_len=self.max_model_len,
        )
        pool = StepInputPool(
            table.block_table,
            table.rows_changed,
            block_size,
            config.max_num_tokens,
            config.max_batch_size,
            table.token_table,
            device,
        )
        decode_plan = plan_decode(
            device,
            model,
            config.max_batch_size,
            config.cuda_graphs,
            force_padding=bool(env_flag("PPRUNTIME_PAD_DECODE")),
            force_graphs=bool(env_flag("PPRUNTIME_FORCE_CUDA_GRAPHS")),
        )
        runner = StageRunner(
            model,
            stage,
            kv_cache,
            pool,
            info.rank,
            StageKnobs.from_env(info.rank),
            decode_plan=decode_plan,
        )
        runner.reserve_device_input(config.max_num_tokens * model_config.hidden_size)
        runner.capture_decode_graphs(max_seq_len=max_blocks_per_seq * block_size)
        last_stage = None
        if stage.is_last_stage:
            last_stage = LastStage(
                table,
                runner,
                self.tokenizer,
                model_config.eos_token_ids,
                config.seed,
            )
        self.tracker = WaitTracker()
        self.tracer = Tracer(info.rank, trace)
        self.device_spans = make_device_spans(device, trace)
        relay = ResponseRelay(
            self.comms.relay, threaded=not parallel.deterministic, tracker=self.tracker
        )
        channel = make_channel(
            self.activation_channel,
            self.comms.pipeline,
            Tag.ACTIVATIONS,
            parallel.microbatch_slots,
            config.max_num_tokens * model_config.hidden_size,
            dtype,
            device,
            runner.input_buffer,
            self.tracker,
        )
        self.executor = PipelineExecutor(
            comms=self.comms,
            runner=runner,
            table=table,
            relay=relay,
            num_slots=parallel.microbatch_slots,
            deterministic=parallel.deterministic,
            max_batch_size=config.max_batch_size,
            max_num_tokens=config.max_num_tokens,
            hidden_size=model_config.hidden_size,
            channel=channel,
            last_stage=last_stage,
            tokenizer=self.tokenizer,
            tracer=self.tracer,
            tracker=self.tracker,
            device_spans=self.device_spans,
            async_scheduling=config.async_scheduling_on(device.type),
        )
        busy = self.tracer.busy_s
        # the thread building the engine is the one that runs the executor (rank 0 steps
        # it from there, the others serve there)
        clock = getattr(time, "pthread_getcpuclockid", None)  # not on every platform
        self._executor_clock = None if clock is None else clock(threading.get_ident())
        self._executor_status = f"/proc/self/task/{threading.get_native_id()}/status"
        self.rank_stats = RankStatsExchange(
            self.comms.watchdog, lambda: busy.get("forward", 0.0), self.rank_counters
        )
        self.watchdog = Watchdog(
            self.comms.watchdog,
            info,
            self.tracker,
            self._has_work,
            parallel.watchdog_timeout_s,
            rank_stats=self.rank_stats,
        )

    def _allocate_kv_cache(self) -> torch.Tensor:
        """The agreed number of blocks, or a ConfigError saying they do not fit: checked
        first, as on the host an allocation too large for the memory but not for the
        address space succeeds and then gets the process killed while it is zeroed."""
        config, device = self.config, self.device
        needed = self.num_blocks * self._bytes_per_block
        available = available_memory_bytes(device)
        problem = (
            f"a KV cache of {self.num_blocks} blocks needs {needed / 2**30:.1f} GiB on {device}"
        )
        remedy = "lower --kv-cache-blocks (kv_cache_blocks)"
        if available is not None and needed > available:
            raise ConfigError(f"{problem} but {available / 2**30:.1f} GiB is free: {remedy}")
        try:
            return allocate_kv_cache(
                self.model_config,
                self.stage,
                self.num_blocks,
                config.block_size,
                self.activation_dtype,
                device,
            )
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(
                f"{problem}, which could not be allocated ({error}): {remedy}"
            ) from None

    def rank_counters(self) -> dict[str, float]:
        """This rank's cumulative counters (rank_stats.COUNTERS), read from any thread."""
        stats = self.executor.stats
        tracer = self.tracer
        counters = {
            "iterations": stats.iterations,
            "batches": stats.batches,
            "tokens_computed": stats.tokens_computed,
            "seqs": stats.seqs,
            "decode_batches": stats.decode_batches,
            "decode_seqs": stats.decode_seqs,
            "empty_iterations": stats.empty_iterations,
            "idle_waits": stats.idle_waits,
            "poll_sleeps": sleep_counts.foreground,
            "background_sleeps": sleep_counts.background,
            "thread_cpu_s": self._executor_cpu_s(),
            "process_cpu_s": time.process_time(),
            **self._context_switches(),
        }
        for name, seconds in dict(tracer.busy_cpu_s).items():  # a copy: others may insert
            counters[f"cpu:{name}"] = seconds
        for name, seconds in dict(tracer.busy_s).items():
            counters[f"wall:{name}"] = seconds
        return counters

    def _executor_cpu_s(self) -> float:
        """The executor thread's CPU seconds so far; 0 where the platform has no thread
        clock, or once the thread that built the engine has exited (an engine built in
        one worker thread and used from another): the clock id is invalid then."""
        if self._executor_clock is None:
            return 0.0
        try:
            return time.clock_gettime(self._executor_clock)
        except OSError:
            return 0.0

    def _context_switches(self) -> dict[str, float]:
        """The executor thread's context switches so far (Linux; none elsewhere): the
        involuntary ones are the times another process took its core."""
        try:
            with open(self._executor_status) as status:
                lines = status.read().splitlines()
        except OSError:
            return {}
        counts = {}
        for line in lines:
            if line.startswith("voluntary_ctxt_switches:"):
                counts["voluntary_switches"] = float(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                counts["involuntary_switches"] = float(line.split()[1])
        return counts

    def _has_work(self) -> bool:
        executor = self.executor
        return not executor.stopped and executor.table.num_in_flight_batches > 0

    @property
    def is_driver(self) -> bool:
        return self.info.rank == 0

    def serve(self) -> None:
        """Ranks > 0: run the executor loop until rank 0 shuts the pipeline down."""
        self.executor.serve()

    def finalize(self) -> list[RankReport] | None:
        """After shutdown (rank 0) / serve (others): gather reports, free communicators."""
        executor = self.executor
        table = executor.table
        report = RankReport(
            rank=self.info.rank,
            kv_blocks_free=table.blocks.num_free_blocks,
            kv_blocks_total=table.blocks.num_blocks,
            iterations=executor.stats.iterations,
            batches=executor.stats.batches,
            tokens_computed=executor.stats.tokens_computed,
            busy_s=dict(self.tracer.busy_s),
            step_counters=vars(executor.runner.pool.counters).copy(),
            block_table_counters=vars(table.counters).copy(),
            events=self.tracer.events + self.device_spans.events(),
            rows_continued=executor.stats.rows_continued,
            busy_cpu_s=dict(self.tracer.busy_cpu_s),
            counters=self.rank_counters(),
        )
        timeout_s = self.config.parallel.watchdog_timeout_s
        try:
            reports = gather_within(
                self.comms.pipeline,
                report,
                0,
                time.monotonic() + timeout_s,
                "the gathering of the ranks' reports at shutdown",
            )
        except RanksMissing as missing:
            report_and_abort(
                self.info,
                f"{describe_ranks(missing.ranks)} did not reach the end of shutdown within "
                f"{timeout_s:g} s (--watchdog-timeout): rank {self.info.rank} waited for it at "
                f"{missing.what}",
            )
        self.watchdog.stop()
        self.rank_stats.finish(reply_window(timeout_s))  # the watchdog communicator is ours now
        if self._process_group:
            destroy_process_group()
        self.comms.free()
        gc.unfreeze()  # what the engine held may now be collected
        return reports
