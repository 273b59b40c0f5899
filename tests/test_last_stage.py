"""The last stage's per-step work: feature counts decide which array work runs.

No MPI, no model: a fake runner returns fixed logits, so the tokens and finish
codes of the fast path (every running request greedy, nothing extra) can be
compared with those of the full path on the same batch.
"""

import numpy as np
import torch

from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.last_stage import FEATURES, LastStage
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.scheduler import Scheduler
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.wire import FINISH_LENGTH, FINISH_NONE, FINISH_STOP
from ppruntime.stage.step_inputs import StepInputPool

VOCAB = 16
EOS = 3
MAX_MODEL_LEN = 12


class FixedLogitsRunner:
    """logits(hidden, rows): flat token 5 prefers eos, token r any other r % VOCAB."""

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor, float32: bool = True):
        # a plain greedy step may take them in another float dtype (the model's)
        logits = torch.zeros(
            rows.shape[0], VOCAB, dtype=torch.float32 if float32 else torch.bfloat16
        )
        preferred = torch.where(rows == 5, EOS, (rows % VOCAB) | 4)  # | 4: never eos
        logits[torch.arange(rows.shape[0]), preferred] = 4.0
        return logits


def make_stage():
    table = SequenceTable(8, 4, BlockManager(32, 4), max_model_len=MAX_MODEL_LEN)
    stage = LastStage(table, FixedLogitsRunner(), None, (EOS,), seed=0)
    return table, Scheduler(table, 8, 64, 1), stage


def run_one_batch(params_list, prompt_len=3):
    table, scheduler, stage = make_stage()
    for seq_id, params in enumerate(params_list):
        prompt = np.arange(prompt_len, dtype=np.int32)
        scheduler.add(SeqInfo(seq_id, str(seq_id), prompt, params))
    batch = scheduler.schedule()
    for slot in batch.admit_slots.tolist():
        stage.admit(table.infos[slot])
    pool = StepInputPool(table.block_table, table.rows_changed, 4, 64, 8, None, torch.device("cpu"))
    inputs = pool.prepare(batch)
    state, diff = stage.sample(batch, torch.zeros(batch.num_tokens, 2), inputs)
    return table, stage, batch, state, diff


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, **kwargs)


def test_feature_counts_follow_admissions_and_releases():
    table, stage, batch, _, _ = run_one_batch(
        [greedy(max_tokens=4), greedy(logprobs=2, ignore_eos=True), SamplingParams(seed=1)]
    )
    assert stage.num_with == {
        "sampling": 1,
        "eos": 2,
        "special": 0,
        "logprobs": 1,
        "generation_logits": 0,
        "prompt_logits": 0,
    }
    for slot in batch.slots.tolist():
        stage.release(slot)
        stage.release(slot)  # a second release changes nothing
    assert stage.num_with == dict.fromkeys(FEATURES, 0)


def test_fast_path_gives_the_tokens_and_finish_codes_of_the_full_path():
    plain = [greedy(max_tokens=1), greedy(max_tokens=5), greedy(max_tokens=50)]
    _, fast_stage, _, fast, fast_diff = run_one_batch(plain)
    assert fast_stage.num_with["logprobs"] == 0 and fast_diff is None
    # the same rows, plus one that forces the full sampling path (log-probs)
    _, full_stage, _, full, full_diff = run_one_batch([*plain, greedy(logprobs=1)])
    assert full_stage.num_with["logprobs"] == 1 and full_diff is not None
    assert fast.token_ids.tolist() == full.token_ids[:3].tolist()
    assert fast.finish.tolist() == full.finish[:3].tolist()
    # prompts of 3: the sampled flat tokens are 2, 5, 8; row 0 stops at max_tokens=1,
    # row 1 samples eos, row 2 goes on
    assert fast.token_ids[1] == EOS and EOS not in fast.token_ids[[0, 2]].tolist()
    assert fast.finish.tolist() == [FINISH_LENGTH, FINISH_STOP, FINISH_NONE]


def test_length_limit_is_the_smaller_of_max_tokens_and_model_room():
    # prompt of 10 in a model of 12 positions: at most 2 outputs whatever max_tokens says
    table, stage, batch, state, _ = run_one_batch([greedy(max_tokens=100, ignore_eos=True)], 10)
    assert table.output_limit[int(batch.slots[0])] == 2
    assert state.finish.tolist() == [FINISH_NONE]  # first output of 2
    table.num_output[int(batch.slots[0])] = 1
    codes = stage._finish_codes(batch.slots, state.token_ids, diff=None)
    assert codes.tolist() == [FINISH_LENGTH]
