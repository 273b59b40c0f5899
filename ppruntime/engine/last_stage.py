"""What the last rank does with a microbatch's hidden states.

It samples one token for every sequence whose chunk reached its end, decides which
sequences finish (eos, stop ids, stop strings, max_tokens, model length, logits that
hold a NaN or an inf: that request alone ends with an error, no token) and builds
the batch's sample state (tokens + finish codes, for every rank) and response diff
(log-probs, logits, stop strings: what changed since the last send, for rank 0).
Per-request parameters live in arrays indexed by slot, so a step costs array
operations, plus Python work only for the rows that asked for something special.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ppruntime.engine.detokenizer import IncrementalDetokenizer
from ppruntime.engine.scheduler import ScheduledBatch
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.stop import StopStringMatcher
from ppruntime.engine.wire import FINISH_LENGTH, FINISH_NONFINITE, FINISH_STOP, SampleState
from ppruntime.stage.device_sampler import (
    DeviceSample,
    DeviceSampler,
    HostSample,
    HostTransfer,
    SamplingRows,
    seed_key,
)
from ppruntime.stage.runner import StageRunner
from ppruntime.stage.step_inputs import StepInputs

_EMPTY_I32 = np.zeros(0, dtype=np.int32)


@dataclass
class ResponseDiff:
    """Per-batch extras that only rank 0 needs (travel sliced when large)."""

    stop_strings: dict[int, str] = field(default_factory=dict)  # slot -> matched stop string
    logprob_slots: np.ndarray = field(default_factory=lambda: _EMPTY_I32)  # [L]
    chosen_logprobs: np.ndarray | None = None  # [L] float32
    top_token_ids: np.ndarray | None = None  # [L, K] int32
    top_logprobs: np.ndarray | None = None  # [L, K] float32
    generation_logit_slots: np.ndarray = field(default_factory=lambda: _EMPTY_I32)  # [G]
    generation_logits: np.ndarray | None = None  # [G, V] float32
    prompt_logits: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    # (slot, first prompt position, logits [n, V] float32)

    def is_empty(self) -> bool:
        return (
            not self.stop_strings
            and self.logprob_slots.shape[0] == 0
            and self.generation_logit_slots.shape[0] == 0
            and not self.prompt_logits
        )


@dataclass
class LaunchedSample:
    """A step whose sampling is queued on the device; `LastStage.complete` finishes it."""

    batch: ScheduledBatch
    slots: np.ndarray  # [S] the slots that sample a token, in batch order
    diff: ResponseDiff
    on_device: DeviceSample | None = None  # token_ids [S]: a continued step's input tokens
    transfer: HostTransfer | None = None  # the results' copy to the host


FEATURES = ("sampling", "eos", "special", "logprobs", "generation_logits", "prompt_logits")


class LastStage:
    def __init__(
        self,
        table: SequenceTable,
        runner: StageRunner,
        tokenizer,
        eos_token_ids: tuple[int, ...],
        seed: int,
    ) -> None:
        self.table = table
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = np.asarray(eos_token_ids, dtype=np.int32)
        self.seed = seed
        self.sampler = DeviceSampler()
        slots = table.max_slots
        self.temperature = np.zeros(slots, dtype=np.float32)
        self.top_k = np.zeros(slots, dtype=np.int32)
        self.top_p = np.ones(slots, dtype=np.float32)
        self.min_p = np.zeros(slots, dtype=np.float32)
        self.max_tokens = np.zeros(slots, dtype=np.int32)
        self.ignore_eos = np.zeros(slots, dtype=np.bool_)
        self.num_logprobs = np.full(slots, -1, dtype=np.int32)
        self.wants_generation_logits = np.zeros(slots, dtype=np.bool_)
        self.wants_prompt_logits = np.zeros(slots, dtype=np.bool_)
        self.prompt_logits_sent = np.zeros(slots, dtype=np.int32)
        self.special = np.zeros(slots, dtype=np.bool_)  # stop ids or stop strings
        # admitted sequences that need each per-step feature: a step skips the array
        # work of a feature no running sequence asked for
        self.num_with = dict.fromkeys(FEATURES, 0)
        self.admitted = np.zeros(slots, dtype=np.bool_)
        self.seed_keys = np.zeros(slots, dtype=np.uint64)  # 64-bit key of each seed
        self.stop_ids: list[frozenset[int]] = [frozenset()] * slots
        self.stop_matchers: list[tuple[IncrementalDetokenizer, StopStringMatcher] | None] = [
            None
        ] * slots

    # -- per request, once --------------------------------------------------------
    def admit(self, info: SeqInfo) -> None:
        slot, params = info.slot, info.params
        self.release(slot)  # no-op unless the slot still counts a previous sequence
        self.temperature[slot] = 0.0 if params.is_greedy else params.temperature
        self.top_k[slot] = max(params.top_k, 0)  # -1 and 0 disable; SamplingParams caps k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.max_tokens[slot] = params.max_tokens
        self.ignore_eos[slot] = params.ignore_eos
        self.num_logprobs[slot] = -1 if params.logprobs is None else params.logprobs
        self.wants_generation_logits[slot] = params.generation_logits
        self.wants_prompt_logits[slot] = params.prompt_logits
        self.prompt_logits_sent[slot] = 0
        # unseeded requests: a seed of their own from the engine seed and the sequence id
        seed = params.seed if params.seed is not None else hash((self.seed, info.seq_id))
        self.seed_keys[slot] = seed_key(seed)
        self.stop_ids[slot] = frozenset(params.stop_token_ids)
        matcher = None
        if params.stop:
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            matcher = (
                IncrementalDetokenizer(self.tokenizer, info.prompt_token_ids),
                StopStringMatcher(params.stop),
            )
        self.stop_matchers[slot] = matcher
        self.special[slot] = bool(params.stop_token_ids) or matcher is not None
        for feature, used in self._features(slot).items():
            self.num_with[feature] += used
        self.admitted[slot] = True

    def release(self, slot: int) -> None:
        if not self.admitted[slot]:
            return
        self.admitted[slot] = False
        for feature, used in self._features(slot).items():
            self.num_with[feature] -= used
        self.temperature[slot] = 0.0
        self.ignore_eos[slot] = True
        self.special[slot] = False
        self.num_logprobs[slot] = -1
        self.wants_generation_logits[slot] = False
        self.wants_prompt_logits[slot] = False
        self.stop_matchers[slot] = None

    def _features(self, slot: int) -> dict[str, bool]:
        return {
            "sampling": bool(self.temperature[slot] != 0.0),
            "eos": not self.ignore_eos[slot],
            "special": bool(self.special[slot]),
            "logprobs": bool(self.num_logprobs[slot] >= 0),
            "generation_logits": bool(self.wants_generation_logits[slot]),
            "prompt_logits": bool(self.wants_prompt_logits[slot]),
        }

    # -- per step -----------------------------------------------------------------
    def sample(
        self, batch: ScheduledBatch, hidden: torch.Tensor, inputs: StepInputs
    ) -> tuple[SampleState, ResponseDiff | None]:
        """Sample the batch and wait for the result (`launch`, then `complete`)."""
        return self.complete(self.launch(batch, hidden, inputs))

    def launch(
        self, batch: ScheduledBatch, hidden: torch.Tensor, inputs: StepInputs
    ) -> LaunchedSample:
        """Queue the step's logits, sampler kernels and copy of the results to the host;
        waits for nothing on CUDA (prompt logits, rarely asked for, are the exception)."""
        sampled = batch.sample_mask
        slots = batch.slots[sampled]
        launched = LaunchedSample(batch, slots, ResponseDiff())
        if slots.shape[0]:
            rows = self._sampling_rows(batch, slots)
            # [S, V]; a plain greedy step takes its argmax in the model's dtype
            logits = self.runner.logits(
                hidden, inputs.sample_token_index, float32=not rows.plain_greedy
            )
            # only the sampled ids and what was asked for come back to the host
            launched.on_device = self.sampler.sample(logits, rows)
            launched.transfer = launched.on_device.to_host()
        if self.num_with["prompt_logits"] and self.wants_prompt_logits[batch.slots].any():
            self._collect_prompt_logits(batch, hidden, launched.diff)
        return launched

    def complete(self, launched: LaunchedSample) -> tuple[SampleState, ResponseDiff | None]:
        """Wait for a launched step's results; finish codes, the sample state and diff.

        Sequences that await release (they finished in an earlier step while this one
        was in flight) gain nothing: no token, no finish code, nothing in the diff.
        """
        batch, slots, diff = launched.batch, launched.slots, launched.diff
        num_seqs = batch.num_seqs
        sampled = batch.sample_mask
        token_ids = np.full(num_seqs, -1, dtype=np.int32)
        finish = np.zeros(num_seqs, dtype=np.int32)
        if slots.shape[0]:
            result = launched.transfer.wait()
            tokens = result.token_ids
            discarded = None
            if self.table.num_awaiting_release:
                discarded = self.table.awaiting_release[slots]
                if not discarded.any():
                    discarded = None
            codes = self._finish_codes(slots, tokens, diff, discarded)
            token_ids[sampled] = tokens
            excluded = result.nonfinite_rows()
            if excluded is not None:  # rare: those requests end with an error, no token
                sampled = self._end_nonfinite(sampled, excluded, slots, codes, token_ids, diff)
            if discarded is not None:
                positions = np.flatnonzero(batch.sample_mask)[discarded]  # in batch order
                sampled = self._discard(sampled, positions, discarded, codes, token_ids)
                excluded = discarded if excluded is None else excluded | discarded
            finish[batch.sample_mask] = codes
            if self.num_with["logprobs"] or self.num_with["generation_logits"]:
                self._collect_sample_extras(slots, result, diff, excluded)
        empty = diff.is_empty()
        state = SampleState(
            batch_id=batch.batch_id,
            slots=batch.slots,
            sampled=sampled,
            token_ids=token_ids,
            finish=finish,
            has_diff=not empty,
        )
        return state, (None if empty else diff)

    @staticmethod
    def _discard(
        sampled: np.ndarray,
        positions: np.ndarray,
        discarded: np.ndarray,
        codes: np.ndarray,
        token_ids: np.ndarray,
    ) -> np.ndarray:
        """Rows of sequences that already finished (`discarded` among the sampled rows,
        at batch `positions`): no token, no code. Returns a new sampled mask."""
        codes[discarded] = 0
        token_ids[positions] = -1
        sampled = sampled.copy()
        sampled[positions] = False
        return sampled

    @staticmethod
    def _end_nonfinite(
        sampled: np.ndarray,
        nonfinite: np.ndarray,
        slots: np.ndarray,
        codes: np.ndarray,
        token_ids: np.ndarray,
        diff: ResponseDiff,
    ) -> np.ndarray:
        """Finish the rows whose logits were not finite: error code, no token gained.

        Returns the batch's new sampled mask (a copy: the schedule's mask is shared).
        """
        codes[nonfinite] = FINISH_NONFINITE
        positions = np.flatnonzero(sampled)[nonfinite]  # in batch order
        token_ids[positions] = -1
        sampled = sampled.copy()
        sampled[positions] = False
        for slot in slots[nonfinite].tolist():
            diff.stop_strings.pop(slot, None)
        return sampled

    def _sampling_rows(self, batch: ScheduledBatch, slots: np.ndarray) -> SamplingRows:
        num_with = self.num_with
        if not (num_with["sampling"] or num_with["logprobs"] or num_with["generation_logits"]):
            return SamplingRows.greedy(slots.shape[0])  # every running sequence: plain greedy
        sampled = batch.sample_mask
        logprob_counts = self.num_logprobs[slots]
        num_logprobs = int(logprob_counts.max()) if (logprob_counts >= 0).any() else 0
        rows = SamplingRows(
            temperature=self.temperature[slots],
            top_k=self.top_k[slots],
            top_p=self.top_p[slots],
            min_p=self.min_p[slots],
            seeds=self.seed_keys[slots],
            # the position of the token each row samples: its context after this chunk
            positions=(batch.starts[sampled] + batch.num_new[sampled]).astype(np.int64),
            # chosen-token log-probs are computed with the top-n
            num_logprobs=max(num_logprobs, 1) if (logprob_counts >= 0).any() else 0,
        )
        if num_with["generation_logits"]:
            rows.logit_rows = np.flatnonzero(self.wants_generation_logits[slots])
        return rows

    def _finish_codes(
        self,
        slots: np.ndarray,
        tokens: np.ndarray,
        diff: ResponseDiff,
        discarded: np.ndarray | None = None,
    ) -> np.ndarray:
        """discarded: [S] bool rows whose stop matchers must not see this token."""
        codes = np.zeros(slots.shape[0], dtype=np.int32)
        # the table's output limit: min(max_tokens, max_model_len - prompt)
        codes[self.table.num_output[slots] >= self.table.output_limit[slots] - 1] = FINISH_LENGTH
        stop = np.zeros(slots.shape[0], dtype=np.bool_)
        if self.num_with["eos"]:
            for eos in self.eos_token_ids.tolist():  # one or two ids: cheaper than np.isin
                stop |= tokens == eos
            stop &= ~self.ignore_eos[slots]
        if not self.num_with["special"]:
            if self.num_with["eos"]:
                codes[stop] = FINISH_STOP
            return codes
        special = self.special[slots]
        if discarded is not None:
            special &= ~discarded
        special_rows = np.flatnonzero(special)
        for row in special_rows.tolist():
            slot = int(slots[row])
            token = int(tokens[row])
            if token in self.stop_ids[slot]:
                stop[row] = True
            matcher = self.stop_matchers[slot]
            if matcher is not None and not stop[row]:
                detokenizer, stop_strings = matcher
                check = stop_strings.feed(detokenizer.append([token]))
                if check.matched is not None:
                    stop[row] = True
                    diff.stop_strings[slot] = check.matched
        codes[stop] = FINISH_STOP
        return codes

    def _collect_sample_extras(
        self,
        slots: np.ndarray,
        result: HostSample,
        diff: ResponseDiff,
        nonfinite: np.ndarray | None,
    ) -> None:
        wants_logprobs = self.num_logprobs[slots] >= 0
        if nonfinite is not None:  # those rows gained no token: nothing to report
            wants_logprobs &= ~nonfinite
        if wants_logprobs.any():
            rows = np.flatnonzero(wants_logprobs)
            diff.logprob_slots = slots[rows]
            diff.chosen_logprobs = result.logprobs[rows]
            diff.top_token_ids = result.top_token_ids[rows]
            diff.top_logprobs = result.top_logprobs[rows]
        wants_logits = self.wants_generation_logits[slots]
        if wants_logits.any():
            rows = np.flatnonzero(wants_logits)
            logits = result.logits  # the rows of SamplingRows.logit_rows
            if nonfinite is not None:
                keep = ~nonfinite[rows]
                rows, logits = rows[keep], logits[keep]
            if rows.shape[0]:
                diff.generation_logit_slots = slots[rows]
                diff.generation_logits = logits

    def _collect_prompt_logits(self, batch: ScheduledBatch, hidden: torch.Tensor, diff) -> None:
        """Logits of the prompt positions in this chunk, sent once per position."""
        offsets = np.concatenate([[0], np.cumsum(batch.num_new)])
        for index in np.flatnonzero(self.wants_prompt_logits[batch.slots]).tolist():
            slot = int(batch.slots[index])
            start = int(batch.starts[index])
            end = min(start + int(batch.num_new[index]), int(self.table.num_prompt[slot]))
            sent = int(self.prompt_logits_sent[slot])
            # send only positions not sent yet: a chunk recomputed after preemption may
            # overlap what was sent, with other chunk boundaries than the first time
            if not start <= sent < end:
                continue
            first = int(offsets[index]) + (sent - start)
            rows = torch.arange(first, first + (end - sent)).to(hidden.device)
            values = self.runner.logits(hidden, rows).cpu().numpy()
            diff.prompt_logits.append((slot, sent, values))
            self.prompt_logits_sent[slot] = end
