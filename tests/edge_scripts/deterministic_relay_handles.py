"""Deterministic mode must not keep the relay's send handles (and buffers) until shutdown."""

from ppruntime.engine import relay as relay_module

_stop = relay_module.ResponseRelay.stop


def stop_and_report(self) -> None:
    # what is still held when shutdown begins: at most the last sends, not one per batch
    print(f"rank {self.rank} held {len(self._pending)} at shutdown", flush=True)
    _stop(self)


relay_module.ResponseRelay.stop = stop_and_report

from ppruntime import LLM, SamplingParams  # noqa: E402

llm = LLM(preset="tiny", device="cpu", deterministic=True, exit_workers=False, max_batch_size=4)
if llm.is_driver:
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2, generation_logits=True)
    llm.generate([[1, 2, 3, 4, 5]] * 8, params)
    print(f"rank 0 batches {llm._executor.stats.batches}", flush=True)
    llm.shutdown()
