"""The non-blocking pipeline executor loop, run by every rank (DESIGN §1).

One iteration of rank r:
  rank 0  handles the batches that are ready (it counts them: that count travels
          in the MICROBATCH header, the broadcast every rank obeys), takes new
          requests and cancellations, schedules one microbatch, sends the header
          (+ control) downstream, runs its stage and sends the activations;
  rank r  receives the header from rank r-1 and forwards it at once, handles the
          same number of ready batches, applies the same control and schedule,
          then runs its stage on the activations of rank r-1 and sends its own
          (the last rank samples and publishes the result to the relay).
Sends are non-blocking; their handles live in the microbatch slot and are waited
on only when the slot is reused, so uneven stages do not stall each other.

With async scheduling (PP=1) the step is launched in its iteration and completed in
the next one, after the next step was launched behind it (ppruntime/engine/overlap.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ppruntime.comm.channels import ActivationChannel
from ppruntime.comm.communicators import PipelineComms
from ppruntime.comm.failure import termination_requested
from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import (
    WaitTracker,
    wait_all,
    wait_raw_message,
)
from ppruntime.engine.control import Control, isend_control, recv_control
from ppruntime.engine.last_stage import LastStage
from ppruntime.engine.outputs import OutputCollector, RequestOutput
from ppruntime.engine.overlap import StepOverlap
from ppruntime.engine.relay import ResponseRelay
from ppruntime.engine.request_book import RequestBook
from ppruntime.engine.scheduler import ScheduledBatch, Scheduler, apply_schedule
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.trace import Tracer
from ppruntime.engine.wire import (
    FINISH_ABORT,
    MicrobatchHeader,
    SampleState,
    microbatch_capacity,
    pack_microbatch,
    unpack_microbatch,
)
from ppruntime.logs import get_logger
from ppruntime.stage.device_spans import DECODE_SPAN, PREFILL_SPAN, DeviceSpans
from ppruntime.stage.runner import StageRunner

log = get_logger("executor")


@dataclass
class MicrobatchSlot:
    """Send handles of one microbatch slot, and the buffers they read from."""

    index: int = 0
    requests: list[MPI.Request] = field(default_factory=list)
    keep_alive: list[object] = field(default_factory=list)
    header_buffer: np.ndarray | None = None
    pending_batch: int | None = None  # deterministic mode: batch whose result is due here


class ExecutorStats:
    def __init__(self) -> None:
        self.iterations = 0
        self.batches = 0
        self.tokens_computed = 0
        self.rows_continued = 0  # async scheduling: rows whose input token was on the device
        self.seqs = 0  # the sequences in the microbatches (over batches: how full)
        self.decode_batches = 0  # microbatches of one new token a sequence
        self.decode_seqs = 0  # the sequences in those (over decode_batches: how full)
        self.empty_iterations = 0  # iterations that ran no microbatch on this rank
        self.idle_waits = 0  # rank 0: steps with nothing to do, that waited for a result


class PipelineExecutor:
    def __init__(
        self,
        comms: PipelineComms,
        runner: StageRunner,
        table: SequenceTable,
        relay: ResponseRelay,
        num_slots: int,
        deterministic: bool,
        max_batch_size: int,
        max_num_tokens: int,
        hidden_size: int,
        channel: ActivationChannel,
        last_stage: LastStage | None,
        tokenizer,
        tracer: Tracer,
        tracker: WaitTracker,
        device_spans: DeviceSpans | None = None,
        async_scheduling: bool = False,
    ) -> None:
        self.comms = comms
        self.comm = comms.pipeline
        self.rank = comms.rank
        self.size = comms.size
        self.runner = runner
        self.table = table
        self.relay = relay
        self.num_slots = num_slots
        self.deterministic = deterministic
        self.last_stage = last_stage
        self.tracer = tracer
        self.device_spans = device_spans or DeviceSpans()
        self.tracker = tracker
        self.stats = ExecutorStats()
        self.hidden_size = hidden_size
        self.channel = channel
        self.iteration = 0
        self.stopped = False
        self.failure: BaseException | None = None  # rank 0: what broke an iteration
        capacity = microbatch_capacity(
            max_batch_size, max_num_tokens, table.block_size, table.max_slots
        )
        self.slots = [
            MicrobatchSlot(index=index, header_buffer=np.zeros(capacity, dtype=np.int32))
            for index in range(num_slots)
        ]
        self.header_in = np.zeros(capacity, dtype=np.int32)
        self.infos: dict[int, SeqInfo] = {}  # every known, unfinished sequence by id
        self.pending: dict[int, SeqInfo] = {}  # registered, not yet admitted (ranks > 0)
        self.is_first = runner.is_first_stage
        self.is_last = runner.is_last_stage
        # rank 0 only
        self.scheduler = (
            Scheduler(
                table,
                max_batch_size,
                max_num_tokens,
                self.size,
                continue_in_flight=async_scheduling,
            )
            if self.rank == 0
            else None
        )
        self.overlap: StepOverlap | None = None
        if async_scheduling:
            if self.size != 1 or deterministic:
                raise ValueError("async scheduling needs one stage and deterministic mode off")
            self.overlap = StepOverlap(last_stage, table.max_slots)
        self.requests = RequestBook(OutputCollector(table, tokenizer)) if self.rank == 0 else None
        self._terminated = False

    def start(self) -> None:
        """Start the relay thread (once every rank has started up)."""
        self.relay.start()

    # ===================================================================================
    # rank 0: the API side
    # ===================================================================================
    @property
    def terminating(self) -> bool:
        """SIGTERM was received: no new requests; running ones end with "abort"."""
        return termination_requested.is_set()

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: np.ndarray,
        params,
        stream: bool = False,
    ) -> None:
        if self.terminating:
            raise RuntimeError("the engine is stopping (SIGTERM received): no new requests")
        self.requests.add(request_id, prompt_token_ids, params, stream)

    def abort(self, request_id: str) -> bool:
        """Queue the cancellation of an unfinished request; False if there is none to
        cancel (unknown, finished, or already being aborted)."""
        return self.requests.abort(request_id)

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is in use by an unfinished request."""
        return self.requests.has(request_id)

    def has_unfinished(self) -> bool:
        return self.requests.num_unfinished > 0

    def take_finished(self) -> list[RequestOutput]:
        return self.requests.take_finished()

    def take_events(self) -> list[RequestOutput]:
        return self.requests.take_events()

    def step(self) -> None:
        """One iteration of rank 0 (returns without sending if nothing can happen).

        An exception inside an iteration (a failing stage, say) leaves the pipeline in
        an unknown state; the executor keeps it in `failure` and refuses to go on, as
        any later step or an orderly shutdown could wait forever for the other ranks.
        """
        if self.failure is not None:
            raise RuntimeError(
                f"the engine failed earlier and cannot go on: {self.failure!r}"
            ) from self.failure
        self.tracker.resume()
        try:
            self._step()
            self.channel.progress()
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            # back in the caller's hands; an idle step is no progress (the wait for
            # results goes on, its clock stopped while the caller has the thread)
            self.tracker.pause()

    def _step(self) -> None:
        if self.stopped:
            raise RuntimeError("the engine has been shut down")
        if self.terminating and not self._terminated:
            self._terminated = True
            log.warning(
                "SIGTERM received: no new requests; aborting %d unfinished request(s)",
                self.requests.num_unfinished,
            )
            self.requests.abort_all()
        slot = self.slots[self.iteration % self.num_slots]
        self._wait_slot(slot)
        ready = self._count_ready(slot)
        with self.tracer.span("handle"):
            self._handle_ready(ready)
        control, infos = self.requests.take_control()
        if control is not None:
            self._apply_control(control, infos)
        with self.tracer.span("schedule"):
            batch = self.scheduler.schedule()
        nothing_happened = batch is None and ready == 0 and control is None
        if self.overlap is not None and self.overlap.has_launched:
            nothing_happened = False  # a launched step is completed below
        # deterministic mode runs empty iterations to reach the slot of a pending batch
        if nothing_happened and (not self.deterministic or not self.table.num_in_flight_batches):
            self._idle_until_ready()
            return
        self._run_iteration(slot, ready, control, batch, shutdown=False)

    def shutdown(self) -> None:
        """Abort what is unfinished, drain in-flight microbatches, stop every rank."""
        if self.stopped:
            return
        self.requests.abort_all()
        while self.table.num_in_flight_batches or self.requests.has_control:
            self.step()
        self.tracker.resume()
        slot = self.slots[self.iteration % self.num_slots]
        self._wait_slot(slot)
        self._run_iteration(slot, 0, None, None, shutdown=True)
        self._teardown()

    def _idle_until_ready(self) -> None:
        """Nothing to schedule or handle: wait for a result instead of spinning."""
        self._post_all_sends()
        self.stats.idle_waits += 1
        with self.tracer.span("idle"):
            if self.table.num_in_flight_batches and not self.deterministic:
                if self.tracker.waiting_for is None:
                    self.tracker.begin("sample states from the last rank")
                if self.relay.ready.wait_for(1, timeout=0.05):
                    self.tracker.end()
            else:
                # nothing in flight and nothing to do: a caller that keeps stepping
                # (waiting for a request that cannot run) must not burn a core
                time.sleep(0.001)

    def _count_ready(self, slot: MicrobatchSlot) -> int:
        if self.deterministic:
            if slot.pending_batch is None:
                return 0
            slot.pending_batch = None
            if not self.is_last:
                with self.tracer.span("relay"):
                    self.relay.receive_inline()
            return 1
        return len(self.relay.ready)

    # ===================================================================================
    # ranks > 0: serve until rank 0 shuts the pipeline down
    # ===================================================================================
    def serve(self) -> None:
        while not self.stopped:
            self._serve_one()

    def _serve_one(self) -> None:
        source = self.rank - 1
        with self.tracer.span("receive-wait"):
            message = wait_raw_message(
                self.comm,
                source,
                Tag.MICROBATCH,
                f"microbatch header from rank {source}",
                out=self.header_in,
                tracker=self.tracker,
            )
        header = unpack_microbatch(message)
        control = None
        if header.has_control:
            control = recv_control(self.comm, source, self.tracker)
        slot = self.slots[header.iteration % self.num_slots]
        self._wait_slot(slot)
        if header.has_activations:
            self.channel.post_receive(header.num_tokens, header.hidden_size, header.dtype_code)
        if not self.is_last:
            self._forward_header(slot, message, control)
        with self.tracer.span("relay-wait"):
            self._wait_ready_for(header.ready_count)
        with self.tracer.span("handle"):
            self._handle_ready(header.ready_count)
        if control is not None:
            self._apply_control(control)
        batch = header.batch
        if batch is not None:
            apply_schedule(self.table, batch, self.pending)
            self._on_admitted(batch)
            hidden_in = None
            if header.has_activations:
                with self.tracer.span("receive-wait", batch.batch_id):
                    hidden_in = self.channel.wait_receive(self.tracker)
            self._compute(slot, batch, hidden_in)
            self.channel.progress()
        else:
            self.stats.empty_iterations += 1
        self.iteration = header.iteration + 1
        self.stats.iterations += 1
        self.tracker.progress()
        if header.shutdown:
            self._teardown()

    def _forward_header(self, slot: MicrobatchSlot, message: np.ndarray, control) -> None:
        size = message.shape[0]
        slot.header_buffer[:size] = message
        out = slot.header_buffer[:size]
        slot.requests.append(self.comm.Isend([out, MPI.BYTE], self.rank + 1, Tag.MICROBATCH))
        if control is not None:
            slot.requests.extend(isend_control(self.comm, control, self.rank + 1, slot.keep_alive))

    def _wait_ready_for(self, count: int) -> None:
        if count == 0:
            return
        if self.deterministic:
            if not self.is_last:
                for _ in range(count):
                    self.relay.receive_inline()
            return
        if self.relay.ready.wait_for(count, timeout=0):
            return
        self._post_all_sends()
        self.tracker.begin(f"{count} ready batch(es) from the relay")
        while not self.relay.ready.wait_for(count, timeout=1.0):
            pass
        self.tracker.end()

    # ===================================================================================
    # shared by all ranks
    # ===================================================================================
    def _run_iteration(
        self,
        slot: MicrobatchSlot,
        ready: int,
        control: Control | None,
        batch: ScheduledBatch | None,
        shutdown: bool,
    ) -> None:
        """Rank 0: send this iteration's header downstream, then compute."""
        num_tokens = batch.num_tokens if batch is not None else 0
        header = MicrobatchHeader(
            iteration=self.iteration,
            ready_count=ready,
            shutdown=shutdown,
            has_control=control is not None,
            batch=batch,
            num_tokens=num_tokens if self.size > 1 else 0,
            hidden_size=self.hidden_size if self.size > 1 else 0,
            dtype_code=self.channel.dtype_code,
        )
        if self.size > 1:
            message = pack_microbatch(header, slot.header_buffer)
            slot.requests.append(self.comm.Isend([message, MPI.BYTE], 1, Tag.MICROBATCH))
            if control is not None:
                slot.requests.extend(isend_control(self.comm, control, 1, slot.keep_alive))
        if batch is not None:
            self._on_admitted(batch)
            self._compute(slot, batch, None)
        else:
            self.stats.empty_iterations += 1
        if self.overlap is not None:
            self._complete_overlapped(launched_now=batch is not None)
        self.iteration += 1
        self.stats.iterations += 1
        self.tracker.progress()

    def _compute(self, slot: MicrobatchSlot, batch: ScheduledBatch, hidden_in) -> None:
        device_mark = self.device_spans.begin()
        overlap = self.overlap
        with self.tracer.span("forward", batch.batch_id):
            carried = None if overlap is None else overlap.carried_tokens(batch)
            hidden, inputs = self.runner.forward(batch, hidden_in, carried)
        stats = self.stats
        stats.batches += 1
        stats.seqs += batch.num_seqs
        stats.tokens_computed += inputs.num_tokens
        stats.rows_continued += batch.continuing.shape[0]
        if self.deterministic:
            slot.pending_batch = batch.batch_id
        kind = DECODE_SPAN if batch.num_tokens == batch.num_seqs else PREFILL_SPAN
        if kind == DECODE_SPAN:
            stats.decode_batches += 1
            stats.decode_seqs += batch.num_seqs
        if overlap is not None:
            with self.tracer.span("launch", batch.batch_id):
                overlap.launch(batch, hidden, inputs)
            self.device_spans.end(device_mark, kind, batch)
            return
        if self.is_last:
            with self.tracer.span("sample", batch.batch_id):
                state, diff = self.last_stage.sample(batch, hidden, inputs)
            self.device_spans.end(device_mark, kind, batch)
            with self.tracer.span("relay", batch.batch_id):
                self.relay.publish(state, diff)
            return
        self.device_spans.end(device_mark, kind, batch)
        with self.tracer.span("send", batch.batch_id):
            slot.requests.append(self.channel.send(slot.index, hidden))

    def _complete_overlapped(self, launched_now: bool) -> None:
        """Async scheduling: complete and land the earlier launched step; the one just
        launched stays in flight while the host prepares the next, unless no request
        is left to go on with (then its blocks come back now, not at the next step)."""
        overlap = self.overlap
        with self.tracer.span("complete"):
            results = overlap.complete_all_but(keep=1 if launched_now else 0)
        with self.tracer.span("handle"):
            for state, diff in results:
                self._land(state, diff)
            if overlap.has_launched and not self.requests.num_unfinished:
                for state, diff in overlap.complete_all_but(keep=0):
                    self._land(state, diff)

    def _post_all_sends(self) -> None:
        """Before a wait on the relay (no polling there): post every activation send,
        as the stages downstream may need them to produce what this rank waits for."""
        self.channel.post_all(self.tracker)

    def _wait_slot(self, slot: MicrobatchSlot) -> None:
        if slot.requests:
            with self.tracer.span("send-wait"):
                wait_all(slot.requests, "sends of a reused microbatch slot", self.tracker)
            slot.requests.clear()
            slot.keep_alive.clear()

    def _on_admitted(self, batch: ScheduledBatch) -> None:
        """Per-request set-up for sequences that entered the table with this batch."""
        if batch.admit_slots.shape[0] == 0:
            return
        for slot in batch.admit_slots.tolist():
            info = self.table.infos[slot]
            if self.last_stage is not None:
                self.last_stage.admit(info)
            if self.requests is not None:
                self.requests.on_admit(info)

    def _apply_control(self, control: Control, local_infos: list[SeqInfo] | None = None) -> None:
        """Register new requests and apply cancellations (rank 0 passes its own infos)."""
        if control.new is not None:
            infos = local_infos if local_infos is not None else control.new.infos()
            for info in infos:
                self.infos[info.seq_id] = info
                if self.rank == 0:
                    self.scheduler.add(info)
                else:
                    self.pending[info.seq_id] = info
        for seq_id in control.aborts:
            self._abort_sequence(seq_id)

    def _abort_sequence(self, seq_id: int) -> None:
        info = self.infos.get(seq_id)
        if info is None:
            return  # finished in the meantime
        if info.slot < 0:  # never admitted
            if self.rank == 0:
                self.scheduler.remove_waiting(info)
            else:
                self.pending.pop(seq_id, None)
            self._finish(info, FINISH_ABORT)
        elif self.table.in_flight[info.slot]:
            self.table.request_abort(info.slot)
        else:
            self._finish(info, FINISH_ABORT)

    def _handle_ready(self, count: int) -> None:
        for _ in range(count):
            state, diff = self.relay.ready.pop()
            self._land(state, diff)

    def _land(self, state: SampleState, diff) -> None:
        table = self.table
        gained = table.land_batch(state.slots, state.sampled, state.token_ids)
        if self.requests is not None:
            self.requests.on_batch(gained, diff)
        finish = state.finish
        if table.num_abort_requested:
            finish = finish.copy()
            finish[table.abort_requested[state.slots]] = FINISH_ABORT
        done = np.flatnonzero(finish)  # FINISH_NONE is 0
        if done.shape[0]:
            infos = [table.infos[slot] for slot in state.slots[done].tolist()]
            self._finish_many(infos, finish[done].tolist())
        releasable = table.releasable()  # finished earlier, their last step has landed
        if releasable:
            self._release(releasable)

    def _finish(self, info: SeqInfo, code: int) -> None:
        self._finish_many([info], [code])

    def _finish_many(self, infos: list[SeqInfo], codes: list[int]) -> None:
        """Release sequences everywhere on this rank (same iteration on every rank)."""
        for info, code in zip(infos, codes):
            if self.requests is not None:
                self.requests.on_finish(info, code)
            self.infos.pop(info.seq_id, None)
        slots = [info.slot for info in infos if info.slot >= 0]
        in_flight = [slot for slot in slots if self.table.in_flight[slot]]
        if in_flight:  # a continued step still uses their blocks (async scheduling)
            self.table.await_release(in_flight)
            slots = [slot for slot in slots if not self.table.in_flight[slot]]
        if slots:
            self._release(slots)

    def _release(self, slots: list[int]) -> None:
        if self.last_stage is not None:
            for slot in slots:
                self.last_stage.release(slot)
        self.table.release_many(slots)

    def _teardown(self) -> None:
        for slot in self.slots:
            self._wait_slot(slot)
        self.relay.stop()
        self.channel.close()
        self.stopped = True
