"""Rank 0's view of each request: what it returns to the user.

`OutputCollector` turns handled batches into `RequestOutput`s: a final output per
request for `generate`, and per-step deltas (new tokens, new text) for streaming
that concatenate to the final output. Work per step is array operations, plus
Python only for requests that stream or asked for log-probs or logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ppruntime.engine.detokenizer import IncrementalDetokenizer
from ppruntime.engine.last_stage import ResponseDiff
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.stop import StopStringMatcher, truncate_at_stop
from ppruntime.engine.wire import FINISH_NONFINITE, FINISH_REASONS
from ppruntime.logs import get_logger

log = get_logger("outputs")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's result (or, when streaming, one delta of it).

    logprobs: one dict per generated token, {token_id: log-prob}, holding the chosen
        token and the top-n alternatives (when `SamplingParams.logprobs` is set).
    prompt_logits: [P, V] float32 raw logits at every prompt position.
    generation_logits: [N, V] float32 raw logits that produced each generated token.
    error: why the request failed when `finish_reason` is "error" (the tokens before
        the failure are kept), else None.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    finished: bool = False
    logprobs: list[dict[int, float]] | None = None
    prompt_logits: np.ndarray | None = None
    generation_logits: np.ndarray | None = None
    stop_reason: str | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None

    def to_json(self) -> dict:
        record = {
            "request_id": self.request_id,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
        }
        if self.logprobs is not None:
            record["logprobs"] = [
                {str(token): value for token, value in step.items()} for step in self.logprobs
            ]
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass
class RequestState:
    info: SeqInfo
    metrics: RequestMetrics
    stream: bool
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    streamed_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    prompt_logit_chunks: list[np.ndarray] = field(default_factory=list)
    prompt_logit_rows: int = 0
    generation_logit_rows: list[np.ndarray] = field(default_factory=list)
    stop_string: str | None = None

    @property
    def simple_deltas(self) -> bool:
        """A delta of this request is its new tokens and their text, nothing else (no
        stop string to hold text back for, no log-probs)."""
        return self.stop_matcher is None and self.logprobs is None


class OutputCollector:
    def __init__(self, table: SequenceTable, tokenizer) -> None:
        self.table = table
        self.tokenizer = tokenizer
        self.requests: dict[int, RequestState] = {}  # by seq_id
        self.by_slot: dict[int, RequestState] = {}
        self.streaming = np.zeros(table.max_slots, dtype=np.bool_)  # by slot
        # admitted requests that stream / have no token yet: a batch skips the
        # array work for either when no running request needs it
        self.num_streaming = 0
        self.num_awaiting_first_token = 0

    def add(self, info: SeqInfo, stream: bool, arrival_time: float) -> None:
        state = RequestState(info, RequestMetrics(arrival_time), stream)
        if info.params.logprobs is not None:
            state.logprobs = []
        if stream and self.tokenizer is not None:
            state.detokenizer = IncrementalDetokenizer(self.tokenizer, info.prompt_token_ids)
            if info.params.stop:
                state.stop_matcher = StopStringMatcher(info.params.stop)
        self.requests[info.seq_id] = state

    def on_admit(self, info: SeqInfo) -> None:
        request = self.requests[info.seq_id]
        self.by_slot[info.slot] = request
        self.streaming[info.slot] = request.stream
        self.num_streaming += request.stream
        self.num_awaiting_first_token += request.metrics.first_token_time is None

    # -- a handled batch --------------------------------------------------------------
    def on_batch(self, sampled_slots: np.ndarray, diff: ResponseDiff | None) -> list[RequestOutput]:
        """Record a batch after the table landed it (sampled_slots gained a token);
        return the streaming deltas."""
        if self.num_awaiting_first_token:
            now = time.monotonic()
            first = sampled_slots[self.table.num_output[sampled_slots] == 1]
            for slot in first.tolist():
                metrics = self.by_slot[slot].metrics
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                    self.num_awaiting_first_token -= 1
        if diff is not None:
            self._apply_diff(diff)
        if not self.num_streaming:
            return []
        streamed = sampled_slots[self.streaming[sampled_slots]]
        if streamed.shape[0] == 0:
            return []
        # Each slot gained one token: read them in one gather. A request without stop
        # strings or log-probs that has streamed every token before this one gets this
        # token and its text (the common case); the others take the general path.
        table = self.table
        counts = table.num_output[streamed]
        newest = table.token_table[streamed, table.num_prompt[streamed] + counts - 1].tolist()
        by_slot = self.by_slot
        deltas = []
        for slot, count, token in zip(streamed.tolist(), counts.tolist(), newest):
            request = by_slot[slot]
            if request.simple_deltas and request.streamed_tokens == count - 1:
                request.streamed_tokens = count
                detokenizer = request.detokenizer
                text = "" if detokenizer is None else detokenizer.append((token,))
                deltas.append(RequestOutput(request.info.request_id, [], [token], text))
            else:
                deltas.append(self._delta(request, slot, finished=False))
        return deltas

    def _apply_diff(self, diff: ResponseDiff) -> None:
        for slot, matched in diff.stop_strings.items():
            self.by_slot[slot].stop_string = matched
        if diff.chosen_logprobs is not None:
            for row, slot in enumerate(diff.logprob_slots.tolist()):
                request = self.by_slot[slot]
                count = request.info.params.logprobs or 0
                token = int(self.table.output_tokens(slot)[-1])
                step = {
                    int(t): float(v)
                    for t, v in zip(diff.top_token_ids[row, :count], diff.top_logprobs[row, :count])
                }
                step[token] = float(diff.chosen_logprobs[row])
                request.logprobs.append(step)
        if diff.generation_logits is not None:
            for row, slot in enumerate(diff.generation_logit_slots.tolist()):
                self.by_slot[slot].generation_logit_rows.append(diff.generation_logits[row])
        for slot, start, logits in diff.prompt_logits:
            request = self.by_slot[slot]
            if start == request.prompt_logit_rows:  # recomputed chunks are not repeated
                request.prompt_logit_chunks.append(logits)
                request.prompt_logit_rows += logits.shape[0]

    def _delta(self, request: RequestState, slot: int, finished: bool) -> RequestOutput:
        table = self.table
        first = int(table.num_prompt[slot]) + request.streamed_tokens
        end = int(table.num_prompt[slot]) + int(table.num_output[slot])
        tokens = table.token_table[slot, first:end].tolist()
        new_logprobs = None
        if request.logprobs is not None:
            new_logprobs = request.logprobs[
                request.streamed_tokens : request.streamed_tokens + len(tokens)
            ]
        request.streamed_tokens += len(tokens)
        text = ""
        if request.detokenizer is not None:
            text = request.detokenizer.append(tokens)
            if finished:
                text += request.detokenizer.flush()
            if request.stop_matcher is not None:
                check = request.stop_matcher.feed(text)
                text = check.text
                if finished and check.matched is None:
                    text += request.stop_matcher.flush()
        return RequestOutput(
            request_id=request.info.request_id,
            prompt_token_ids=[],
            token_ids=tokens,
            text=text,
            logprobs=new_logprobs,
        )

    # -- a finished request -----------------------------------------------------------
    def finish(self, info: SeqInfo, finish_code: int) -> tuple[RequestOutput, RequestOutput | None]:
        """The final output, and the last streaming delta (None if not streaming)."""
        request = self.requests.pop(info.seq_id)
        now = time.monotonic()
        request.metrics.finished_time = now
        reason = FINISH_REASONS[finish_code]
        last_delta = None
        if info.slot >= 0:
            if self.by_slot.pop(info.slot, None) is not None:
                self.num_streaming -= request.stream
                self.num_awaiting_first_token -= request.metrics.first_token_time is None
            self.streaming[info.slot] = False
            tokens = self.table.output_tokens(info.slot)
            if request.stream:
                last_delta = self._delta(request, info.slot, finished=True)
        else:  # finished (aborted) before it was ever scheduled
            tokens = np.zeros(0, dtype=np.int32)
            if request.stream:
                last_delta = RequestOutput(info.request_id, [], [], "")
        text = ""
        if self.tokenizer is not None:
            # decoded after the prompt, like the streamed deltas (which concatenate to it)
            if request.detokenizer is not None:
                text = request.detokenizer.text
            else:
                detokenizer = IncrementalDetokenizer(self.tokenizer, info.prompt_token_ids)
                text = detokenizer.append(tokens) + detokenizer.flush()
            if request.stop_string is not None:
                text, _ = truncate_at_stop(text, [request.stop_string])
        output = RequestOutput(
            request_id=info.request_id,
            prompt_token_ids=info.prompt_token_ids.tolist(),
            token_ids=tokens.tolist(),
            text=text,
            finish_reason=reason,
            finished=True,
            logprobs=request.logprobs,
            prompt_logits=(
                np.concatenate(request.prompt_logit_chunks) if request.prompt_logit_chunks else None
            ),
            generation_logits=(
                np.stack(request.generation_logit_rows) if request.generation_logit_rows else None
            ),
            stop_reason=request.stop_string,
            metrics=request.metrics,
            error=_error_message(finish_code, tokens.shape[0]),
        )
        if output.error is not None:
            log.warning("request %s failed: %s", info.request_id, output.error)
        if last_delta is not None:
            last_delta.finished = True
            last_delta.finish_reason = reason
            last_delta.metrics = request.metrics
            last_delta.error = output.error
        return output, last_delta


def _error_message(finish_code: int, num_tokens: int) -> str | None:
    if finish_code != FINISH_NONFINITE:
        return None
    return (
        f"the model produced non-finite logits (NaN or inf) for generated token "
        f"{num_tokens + 1}, so the request ended with the {num_tokens} token(s) before it: "
        "check the checkpoint's weights (with float16, try --dtype bfloat16 or float32)"
    )
