"""Pipeline-parallel scenarios run inside ONE MPI job (tests/test_pipeline_parallel.py).

    mpirun -n N python tests/mpi_scenarios.py --scenario greedy,features \
        --ckpt-root DIR --layer-partition 1,3,1 --out result.json

Each scenario creates one or more `LLM(..., exit_workers=False)` engines one after
another (every rank gets the object back after shutdown, so the job goes on to the
next engine). Rank 0 writes one JSON object, keyed by scenario, to `--out`; large
arrays (logits) go to `--out` with the suffix `.npz`, named by the JSON's "npz" keys.

Checkpoint layout expected under `--ckpt-root`: `<arch>/` for each architecture
(`greedy`), `features/` (a llama with a word tokenizer), `sliced/` (vocab 4096) and
`long/` (max_position_embeddings >= 16400). The prompts are functions of this module
so that the test computes its transformers reference on exactly the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MODES = ("det", "async")
GREEDY_MAX_TOKENS = 20
LONG_PROMPT_TOKENS = 16000
LONG_MAX_TOKENS = 6
SLICED_PROMPT_TOKENS = 300
SHUTDOWN_AFTER_STEPS = (0, 1, 5)  # queued only, one microbatch in, pipeline full
MAX_STEPS = 10_000
SMALL_BLOCK = 8  # prompts and outputs cross several KV block boundaries
ABORT_PROMPT_TOKENS = 40  # prefilled in chunks of ABORT_CHUNK_TOKENS
ABORT_CHUNK_TOKENS = 8
ABORT_MAX_TOKENS = 200
CADENCE_TOKENS = 6
KV_MIN_MEMORY_MB = 1  # small enough that stages with more layers get fewer blocks


# -- prompts (shared with the test) ------------------------------------------------------
def greedy_prompts(vocab_size: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(1234)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in (5, 11, 23, 40)]


def sampled_prompts(vocab_size: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(99)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in (7, 19, 31)]


def abort_prompt(vocab_size: int = 300) -> np.ndarray:
    rng = np.random.default_rng(55)
    return rng.integers(3, vocab_size, size=ABORT_PROMPT_TOKENS).astype(np.int32)


def text_prompts() -> list[str]:
    return ["w5 w17 w42 w8", "w100 w3 w77 w250 w12 w9 w31", "w64"]


def long_prompt(vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(3, vocab_size, size=LONG_PROMPT_TOKENS).astype(np.int32)


def sliced_prompt(vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng(8)
    return rng.integers(3, vocab_size, size=SLICED_PROMPT_TOKENS).astype(np.int32)


# -- helpers ----------------------------------------------------------------------------
class Recorder:
    """Rank 0's results: JSON-able values plus named arrays for the .npz file."""

    def __init__(self) -> None:
        self.results: dict = {}
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, value: np.ndarray | None) -> str | None:
        if value is None:
            return None
        self.arrays[name] = np.asarray(value)
        return name


def output_record(output, recorder: Recorder | None = None, prefix: str = "") -> dict:
    record = {
        "request_id": output.request_id,
        "prompt_token_ids": list(output.prompt_token_ids),
        "token_ids": list(output.token_ids),
        "text": output.text,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "logprobs": (
            None
            if output.logprobs is None
            else [{str(t): float(v) for t, v in step.items()} for step in output.logprobs]
        ),
    }
    if recorder is not None:
        record["prompt_logits"] = recorder.array(f"{prefix}/prompt_logits", output.prompt_logits)
        record["generation_logits"] = recorder.array(
            f"{prefix}/generation_logits", output.generation_logits
        )
    return record


def report_records(reports) -> list[dict]:
    return [
        {
            "rank": r.rank,
            "kv_blocks_free": r.kv_blocks_free,
            "kv_blocks_total": r.kv_blocks_total,
            "iterations": r.iterations,
            "batches": r.batches,
        }
        for r in reports
    ]


class Job:
    def __init__(self, args: argparse.Namespace) -> None:
        from mpi4py import MPI

        self.args = args
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.root = Path(args.ckpt_root)
        self.recorder = Recorder()

    def llm(self, ckpt: str, mode: str, partition: str | None = "default", **kwargs):
        from ppruntime import LLM

        if partition == "default":
            partition = self.args.layer_partition
        kwargs.setdefault("block_size", SMALL_BLOCK)
        return LLM(
            model=str(self.root / ckpt),
            layer_partition=partition if self.size > 1 else None,
            deterministic=(mode == "det"),
            device="cpu",
            exit_workers=False,
            watchdog_timeout_s=120,
            **kwargs,
        )

    def finish(self, llm) -> list[dict] | None:
        reports = llm.shutdown()
        return report_records(reports) if self.rank == 0 else None

    # -- scenarios ----------------------------------------------------------------------
    def greedy(self) -> dict:
        """Greedy + seeded sampled requests per architecture and mode."""
        from ppruntime import SamplingParams

        out: dict = {}
        archs = self.args.archs.split(",")
        modes = self.args.modes.split(",")
        repeat = set(filter(None, self.args.repeat_det.split(",")))
        greedy = SamplingParams(
            max_tokens=GREEDY_MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2
        )
        sampled = [
            SamplingParams(
                max_tokens=12,
                temperature=0.8,
                top_p=0.9,
                top_k=50,
                seed=10 + i,
                ignore_eos=True,
                logprobs=1,
            )
            for i in range(3)
        ]
        for arch in archs:
            runs = [(mode, mode) for mode in modes]
            if "det" in modes and arch in repeat:
                runs.append(("det_repeat", "det"))
            for key, mode in runs:
                llm = self.llm(arch, mode)
                record = None
                if llm.is_driver:
                    prompts = [np.asarray(p, dtype=np.int32) for p in greedy_prompts()]
                    samples = [np.asarray(p, dtype=np.int32) for p in sampled_prompts()]
                    outputs = llm.generate(
                        prompts + samples, [greedy] * len(prompts) + sampled, use_tqdm=False
                    )
                    record = {
                        "greedy": [output_record(o) for o in outputs[: len(prompts)]],
                        "sampled": [output_record(o) for o in outputs[len(prompts) :]],
                    }
                reports = self.finish(llm)
                if record is not None:
                    record["reports"] = reports
                    out[f"{arch}/{key}"] = record
        return out

    def channels(self) -> dict:
        """Greedy prompts over each activation channel of --channels, in each mode."""
        from ppruntime import SamplingParams

        out: dict = {}
        greedy = SamplingParams(
            max_tokens=GREEDY_MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2
        )
        prompts = [np.asarray(p, dtype=np.int32) for p in greedy_prompts()]
        for arch in self.args.archs.split(","):
            for channel in self.args.channels.split(","):
                for mode in self.args.modes.split(","):
                    llm = self.llm(arch, mode, activation_channel=channel)
                    record = None
                    if llm.is_driver:
                        outputs = llm.generate(prompts, [greedy] * len(prompts), use_tqdm=False)
                        record = {
                            "greedy": [output_record(o) for o in outputs],
                            "channel": llm._engine.activation_channel,
                        }
                    reports = self.finish(llm)
                    if record is not None:
                        record["reports"] = reports
                        out[f"{arch}/{channel}/{mode}"] = record
        return out

    def features(self) -> dict:
        """Streaming, stop strings, abort, log-probs, prompt and generation logits."""
        from ppruntime import SamplingParams

        out: dict = {}
        for mode in self.args.modes.split(","):
            llm = self.llm("features", mode)
            if llm.is_driver:
                out[mode] = self._features_on(llm, SamplingParams, f"features/{mode}")
            reports = self.finish(llm)
            if llm.is_driver:
                out[mode]["reports"] = reports
        return out

    def _features_on(self, llm, SamplingParams, prefix: str) -> dict:
        rec = self.recorder
        result: dict = {}
        prompts = text_prompts()
        plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        # plain generate, then the same requests streamed
        result["plain"] = [output_record(o) for o in llm.generate(prompts, plain, use_tqdm=False)]
        deltas: dict[str, list] = {}
        order: list[str] = []
        for delta in llm.generate_stream(prompts, plain):
            if delta.request_id not in deltas:
                order.append(delta.request_id)
                deltas[delta.request_id] = []
            deltas[delta.request_id].append(
                {
                    "token_ids": list(delta.token_ids),
                    "text": delta.text,
                    "finished": delta.finished,
                    "finish_reason": delta.finish_reason,
                }
            )
        result["stream"] = [deltas[request_id] for request_id in sorted(order, key=_req_num)]
        # stop strings: the 4th generated word of the first plain output
        words = result["plain"][0]["text"].split()
        stop_word = words[3] if len(words) > 3 else words[-1]
        stop = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop_word])
        result["stop_word"] = stop_word
        result["stop"] = [output_record(o) for o in llm.generate(prompts[:1], stop, use_tqdm=False)]
        stop_stream = []
        for delta in llm.generate_stream(prompts[:1], stop):
            stop_stream.append(
                {
                    "token_ids": list(delta.token_ids),
                    "text": delta.text,
                    "finished": delta.finished,
                    "finish_reason": delta.finish_reason,
                }
            )
        result["stop_stream"] = stop_stream
        # log-probs and logits
        heavy = SamplingParams(
            max_tokens=8,
            temperature=0.0,
            ignore_eos=True,
            logprobs=3,
            prompt_logits=True,
            generation_logits=True,
        )
        heavy_outputs = llm.generate(prompts, heavy, use_tqdm=False)
        result["heavy"] = [
            output_record(o, rec, f"{prefix}/heavy{i}") for i, o in enumerate(heavy_outputs)
        ]
        # abort: two long requests, abort one after a few steps, let the other finish
        long_params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        keep_params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        victim = llm.add_request(prompts[1], long_params, request_id="victim", stream=True)
        keeper = llm.add_request(prompts[2], keep_params, request_id="keeper")
        finished: dict[str, object] = {}
        victim_tokens = 0
        for _ in range(MAX_STEPS):  # until the victim is surely running
            done, deltas = llm.step()
            finished.update({o.request_id: o for o in done})
            victim_tokens += sum(len(d.token_ids) for d in deltas if d.request_id == victim)
            if victim_tokens >= 3:
                break
        result["victim_tokens_before_abort"] = victim_tokens
        aborted = llm.abort(victim)
        while len(finished) < 2:
            done, _ = llm.step()
            finished.update({o.request_id: o for o in done})
        result["abort_accepted"] = aborted
        result["abort"] = {k: output_record(finished[k]) for k in (victim, keeper)}
        result["abort_unknown"] = llm.abort("no-such-request")
        # the kept request must equal the same request run alone
        result["keeper_alone"] = output_record(
            llm.generate([prompts[2]], keep_params, use_tqdm=False)[0]
        )
        return result

    def sliced(self) -> dict:
        """Prompt logits over 2 MiB travel sliced; values must equal PP=1's."""
        from ppruntime import SamplingParams
        from ppruntime.comm.sliced import SLICE_STATS

        out: dict = {}
        for mode in self.args.modes.split(","):
            before = (SLICE_STATS.sliced_sends, SLICE_STATS.sliced_recvs)
            llm = self.llm("sliced", mode, partition=self.args.sliced_partition or "default")
            record = None
            if llm.is_driver:
                params = SamplingParams(
                    max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logits=True
                )
                prompt = sliced_prompt(llm.vocab_size)
                output = llm.generate([prompt], params, use_tqdm=False)[0]
                record = output_record(output, self.recorder, f"sliced/{mode}")
                record["prompt_logits_bytes"] = int(output.prompt_logits.nbytes)
            reports = self.finish(llm)
            stats = self.comm.gather(
                (SLICE_STATS.sliced_sends - before[0], SLICE_STATS.sliced_recvs - before[1]),
                root=0,
            )
            if record is not None:
                record["reports"] = reports
                record["sliced_sends"] = [s for s, _ in stats]
                record["sliced_recvs"] = [r for _, r in stats]
                out[mode] = record
        return out

    def long(self) -> dict:
        """A 16k-token prompt, chunked (max_num_tokens 2048)."""
        from ppruntime import SamplingParams

        llm = self.llm(
            "long",
            "det",
            partition=None,
            max_num_tokens=2048,
            max_batch_size=4,
            block_size=16,
        )
        record = None
        if llm.is_driver:
            params = SamplingParams(
                max_tokens=LONG_MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2
            )
            output = llm.generate([long_prompt(llm.vocab_size)], params, use_tqdm=False)[0]
            record = output_record(output)
            record["prompt_len"] = len(output.prompt_token_ids)
        reports = self.finish(llm)
        if record is None:
            return {}
        record["reports"] = reports
        return record

    def shutdown(self) -> dict:
        """shutdown() with requests in flight: clean exit, all KV blocks free everywhere."""
        from ppruntime import SamplingParams

        out: dict = {}
        for mode in self.args.modes.split(","):
            for steps in SHUTDOWN_AFTER_STEPS:
                llm = self.llm("llama", mode)
                record = None
                if llm.is_driver:
                    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
                    for i, prompt in enumerate(greedy_prompts()):
                        llm.add_request(np.asarray(prompt, dtype=np.int32), params, f"long-{i}")
                    finished = []
                    for _ in range(steps):
                        done, _ = llm.step()
                        finished.extend(o.request_id for o in done)
                    record = {"finished_before_shutdown": finished}
                reports = self.finish(llm)  # no waiting: requests are in flight
                if record is not None:
                    record["reports"] = reports
                    out[f"{mode}/{steps}"] = record
        return out

    def abort(self) -> dict:
        """abort() of a request in flight at PP >= 2: during a prefill chunk and mid-decode.

        Rank 0 records how many iterations (and steps) the abort took to land, what the
        request ended with, and its own KV state once nothing runs any more; the shutdown
        reports then show every rank's KV state (shutdown itself aborts nothing here).
        """
        from ppruntime import SamplingParams

        out: dict = {}
        victim_params = SamplingParams(
            max_tokens=ABORT_MAX_TOKENS, temperature=0.0, ignore_eos=True
        )
        keeper_params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        for mode in self.args.modes.split(","):
            for when in ("prefill", "decode"):
                llm = self.llm("llama", mode, max_num_tokens=ABORT_CHUNK_TOKENS, max_batch_size=4)
                record = None
                if llm.is_driver:
                    record = self._abort_on(llm, when, victim_params, keeper_params)
                reports = self.finish(llm)
                if record is not None:
                    record["reports"] = reports
                    out[f"{mode}/{when}"] = record
        return out

    def _abort_on(self, llm, when: str, victim_params, keeper_params) -> dict:
        executor, table = llm._executor, llm._executor.table
        victim = llm.add_request(abort_prompt(), victim_params, request_id="victim", stream=True)
        keeper = llm.add_request(greedy_prompts()[0], keeper_params, request_id="keeper")
        victim_seq = executor.requests.seq_id_of(victim)
        finished: dict[str, object] = {}
        tokens = 0

        def caught() -> bool:  # the victim is in flight, in the phase asked for
            info = executor.infos.get(victim_seq)
            if info is None or info.slot < 0 or not table.in_flight[info.slot]:
                return False
            computed = int(table.num_computed[info.slot])
            if when == "prefill":
                return 0 < computed < ABORT_PROMPT_TOKENS
            return tokens >= 3

        for _ in range(MAX_STEPS):
            if caught():
                break
            done, deltas = llm.step()
            finished.update({o.request_id: o for o in done})
            tokens += sum(len(d.token_ids) for d in deltas if d.request_id == victim)
        slot = executor.infos[victim_seq].slot
        record = {
            "in_flight_at_abort": bool(table.in_flight[slot]),
            "computed_at_abort": int(table.num_computed[slot]),
            "tokens_at_abort": tokens,
            "victim_finished_before_abort": victim in finished,
        }
        record["abort_accepted"] = llm.abort(victim)
        iteration, steps = executor.iteration, 0
        while victim not in finished and steps < MAX_STEPS:
            done, _ = llm.step()
            steps += 1
            finished.update({o.request_id: o for o in done})
        record["abort_iterations"] = executor.iteration - iteration
        record["abort_steps"] = steps
        while keeper not in finished and steps < 2 * MAX_STEPS:
            done, _ = llm.step()
            steps += 1
            finished.update({o.request_id: o for o in done})
        record["outputs"] = {k: output_record(v) for k, v in finished.items()}
        record["rank0_kv_free"] = [table.blocks.num_free_blocks, table.blocks.num_blocks]
        record["slots"] = len(executor.slots)
        return record

    def cadence(self) -> dict:
        """Deterministic mode: the step at which each token of a lone request arrives
        (a batch scheduled in iteration i is handled in iteration i + pp_size). The
        engine also has a KV budget small enough to differ per stage: every rank must
        use the minimum over ranks. After shutdown every rank says whether its three
        communicators were freed."""
        from ppruntime import SamplingParams

        llm = self.llm("llama", "det", kv_cache_memory_mb=KV_MIN_MEMORY_MB)
        record = None
        if llm.is_driver:
            params = SamplingParams(max_tokens=CADENCE_TOKENS, temperature=0.0, ignore_eos=True)
            request = llm.add_request(greedy_prompts()[0], params, stream=True)
            arrivals: list[int] = []
            done: list = []
            step = 0
            while not done and step < MAX_STEPS:
                done, deltas = llm.step()
                for delta in deltas:
                    if delta.request_id == request:
                        arrivals += [step] * len(delta.token_ids)
                step += 1
            record = {
                "arrival_steps": arrivals,
                "token_ids": done[0].token_ids if done else None,
                "slots": len(llm._executor.slots),
            }
        reports = self.finish(llm)
        # gathered after shutdown: ranks > 0 serve inside LLM(...) until then
        from mpi4py import MPI

        comms = llm._engine.comms
        freed = [c == MPI.COMM_NULL for c in (comms.pipeline, comms.relay, comms.watchdog)]
        local_blocks = self.comm.gather(llm._engine._local_blocks, root=0)
        comms_freed = self.comm.gather(freed, root=0)
        if record is None:
            return {}
        record["reports"] = reports
        record["local_blocks"] = local_blocks
        record["comms_freed"] = comms_freed
        return record


def _req_num(request_id: str) -> int:
    return int(request_id.rsplit("-", 1)[1])


SCENARIOS = ("greedy", "features", "sliced", "long", "shutdown", "abort", "cadence", "channels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", required=True, help="comma list of " + ",".join(SCENARIOS))
    parser.add_argument("--ckpt-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layer-partition", default=None)
    parser.add_argument("--sliced-partition", default=None)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat-det", default="", help="archs whose det run is repeated")
    parser.add_argument("--channels", default="host", help="activation channels (channels)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PPRUNTIME_DEVICE", "cpu")
    job = Job(args)
    results: dict = {"world_size": job.size}
    try:
        for name in args.scenario.split(","):
            if name not in SCENARIOS:
                raise SystemExit(f"unknown scenario {name!r}; choose from {SCENARIOS}")
            results[name] = getattr(job, name)()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)  # never leave the other ranks waiting
        raise
    if job.rank == 0:
        out = Path(args.out)
        if job.recorder.arrays:
            np.savez(out.with_suffix(".npz"), **job.recorder.arrays)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
