"""Runs one stage's forward for a microbatch: step inputs, model, KV cache."""

from __future__ import annotations

import torch

from ppruntime.model.partition import StageSpec
from ppruntime.stage.debug_knobs import StageKnobs
from ppruntime.stage.step_inputs import StepInputPool, StepInputs


class StageRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        stage: StageSpec,
        kv_cache: torch.Tensor,
        pool: StepInputPool,
        rank: int,
        knobs: StageKnobs | None = None,
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

    def reserve_device_input(self, num_elements: int) -> None:
        """Size of the device copy of received activations (allocated on first use)."""
        self._device_input_size = num_elements

    @property
    def is_first_stage(self) -> bool:
        return self.stage.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.stage.is_last_stage

    def forward(self, batch, hidden_in: torch.Tensor | None) -> tuple[torch.Tensor, StepInputs]:
        """hidden_in: [T, H] from the previous stage (None on the first stage)."""
        self.knobs.before_forward(self.rank, self.num_forwards)
        self.num_forwards += 1
        inputs = self.pool.prepare(batch)
        model_input = inputs.token_ids if self.is_first_stage else hidden_in
        if model_input is not None and model_input.device != self.pool.device:
            model_input = self._to_device(model_input)
        with torch.inference_mode():
            hidden = self.model(model_input, inputs.positions, inputs.attn, self.kv_cache)
        return hidden, inputs

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Activations arrive in host memory (MPI buffers); copy them into a device buffer."""
        count = host.numel()
        if self._device_input is None or self._device_input.numel() < count:
            self._device_input = torch.empty(
                max(count, self._device_input_size), dtype=host.dtype, device=self.pool.device
            )
        view = self._device_input[:count].view(host.shape)
        view.copy_(host, non_blocking=True)
        return view

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] float32 of the given flat token rows (last stage).

        rows are increasing and distinct: as many rows as tokens means every row.
        """
        with torch.inference_mode():
            if rows.shape[0] != hidden.shape[0]:
                hidden = hidden.index_select(0, rows)
            logits = self.model.compute_logits(hidden)
            return logits if logits.dtype == torch.float32 else logits.float()
