"""Runs one stage's forward for a microbatch: step inputs, model, KV cache.

Decode microbatches may be padded to a bucket size and replayed from a CUDA graph
(ppruntime/stage/graphs.py); the caller sees the same thing either way: the hidden
states of the real rows and the step inputs of the real rows.
"""

from __future__ import annotations

import torch

from ppruntime.logs import get_logger
from ppruntime.model.partition import StageSpec
from ppruntime.stage.debug_knobs import StageKnobs
from ppruntime.stage.graphs import DecodeGraphs, DecodePlan, PaddingOnlyBatch, bucket_for
from ppruntime.stage.step_inputs import CarriedTokens, StepInputPool, StepInputs

log = get_logger("runner")


class StageRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        stage: StageSpec,
        kv_cache: torch.Tensor,
        pool: StepInputPool,
        rank: int,
        knobs: StageKnobs | None = None,
        decode_plan: DecodePlan | None = None,
    ) -> None:
        self.model = model
        self.stage = stage
        self.kv_cache = kv_cache
        self.pool = pool
        self.rank = rank
        self.knobs = knobs or StageKnobs()
        self.num_forwards = 0
        self._device_input: torch.Tensor | None = None
        self._device_input_size = 0
        self.decode_plan = decode_plan or DecodePlan()
        self.graphs = DecodeGraphs()
        self.num_padded_forwards = 0  # decode forwards padded to a bucket (replayed or not)
        self.num_replays = 0

    def reserve_device_input(self, num_elements: int) -> None:
        """Size of the persistent input buffer (allocated on first use)."""
        self._device_input_size = num_elements

    @property
    def is_first_stage(self) -> bool:
        return self.stage.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.stage.is_last_stage

    def forward(
        self, batch, hidden_in: torch.Tensor | None, carried: CarriedTokens | None = None
    ) -> tuple[torch.Tensor, StepInputs]:
        """hidden_in: [T, H] from the previous stage, on this stage's device (the
        activation channel delivers it in `input_buffer`); None on the first stage.
        carried: input token ids still on the device (async scheduling, first stage).

        Returns the hidden states [T, H] of the real rows and their step inputs.
        """
        self.knobs.before_forward(self.rank, self.num_forwards)
        self.num_forwards += 1
        num_seqs = batch.slots.shape[0]
        plan = self.decode_plan
        if not plan.pads or batch.num_tokens != num_seqs:
            return self._eager(batch, hidden_in, carried)
        size = bucket_for(num_seqs, plan.sizes)
        inputs = self.pool.prepare(batch, pad_to=size, carried=carried)
        self.num_padded_forwards += size > num_seqs
        model_input = self._padded_model_input(inputs, hidden_in, size)
        with torch.inference_mode():
            if size in self.graphs:
                self.num_replays += 1
                output = self.graphs.replay(size)[:num_seqs]
                if self.is_last_stage:
                    # sampled from in stream order before the next replay rewrites it
                    return output, inputs
                # the next replay overwrites the graph's output, and this microbatch's
                # output may still be on its way to the next stage: copy the real rows out
                return output.clone(), inputs
            hidden = self.model(model_input, inputs.positions, inputs.attn, self.kv_cache)
        return hidden[:num_seqs], inputs

    def _eager(
        self, batch, hidden_in: torch.Tensor | None, carried: CarriedTokens | None
    ) -> tuple[torch.Tensor, StepInputs]:
        inputs = self.pool.prepare(batch, carried=carried)
        model_input = inputs.token_ids if self.is_first_stage else hidden_in
        with torch.inference_mode():
            hidden = self.model(model_input, inputs.positions, inputs.attn, self.kv_cache)
        return hidden, inputs

    def _padded_model_input(
        self, inputs: StepInputs, hidden_in: torch.Tensor | None, size: int
    ) -> torch.Tensor:
        """The first stage's padded token ids, or [size, H] rows of the persistent input
        buffer: the received activations, then zero rows (a graph reads them there)."""
        if self.is_first_stage:
            return inputs.token_ids
        hidden_size = self.model.config.hidden_size
        buffer = self.input_buffer(size * hidden_size)
        padded = buffer[: size * hidden_size].view(size, hidden_size)
        if hidden_in is not None:
            num_real = hidden_in.shape[0]
            if hidden_in.data_ptr() != padded.data_ptr():  # not received in place
                padded[:num_real].copy_(hidden_in, non_blocking=True)
            padded[num_real:].zero_()
        return padded

    def capture_decode_graphs(self, max_seq_len: int) -> None:
        """Capture the decode graph of every bucket (CUDA; start-up, before any request).

        max_seq_len: the longest context a sequence can reach (the capture's plan)."""
        if not self.decode_plan.use_graphs:
            if self.pool.device.type == "cuda":
                log.info("rank %d: CUDA graphs off: %s", self.rank, self.decode_plan.reason)
            return
        if not self.is_first_stage:
            self.input_buffer(self._device_input_size)

        def prepare(size: int) -> StepInputs:
            inputs = self.pool.prepare(PaddingOnlyBatch(), pad_to=size)
            inputs.attn.max_seq_len = max_seq_len
            return inputs

        def run(inputs: StepInputs, size: int) -> torch.Tensor:
            model_input = self._padded_model_input(inputs, None, size)
            return self.model(model_input, inputs.positions, inputs.attn, self.kv_cache)

        self.graphs.capture(self.decode_plan.sizes, prepare, run)
        log.info(
            "rank %d: captured %d decode CUDA graphs (batch sizes %s) in %.2f s",
            self.rank,
            len(self.graphs.graphs),
            ",".join(map(str, self.decode_plan.sizes)),
            self.graphs.capture_s,
        )

    def input_buffer(self, count: int) -> torch.Tensor:
        """The persistent (flat) input buffer of at least `count` elements, on the
        stage's device (fixed address: graphs read from it; channels write into it)."""
        if self._device_input is None or self._device_input.numel() < count:
            if self.graphs.graphs:
                raise RuntimeError(
                    f"rank {self.rank}: {count} input elements exceed the persistent buffer "
                    f"of {self._device_input.numel()} the CUDA graphs read from"
                )
            self._device_input = torch.empty(
                max(count, self._device_input_size),
                dtype=self.model.dtype,
                device=self.pool.device,
            )
        return self._device_input

    def logits(
        self, hidden: torch.Tensor, rows: torch.Tensor, float32: bool = True
    ) -> torch.Tensor:
        """Logits [N, V] of the given flat token rows (last stage): float32, or with
        float32=False in the model's dtype (a plain greedy step: the argmax and the
        maxima are the same, without converting [N, V] values).

        rows are increasing and distinct: as many rows as tokens means every row.
        """
        with torch.inference_mode():
            if rows.shape[0] != hidden.shape[0]:
                hidden = hidden.index_select(0, rows)
            logits = self.model.compute_logits(hidden, float32=float32)
            if float32 and logits.dtype != torch.float32:
                logits = logits.float()
            return logits
