"""Greedy outputs vs a Hugging Face reference, compared the way vLLM's tests do.

With random weights the argmax is fragile where the two best tokens are nearly tied,
so a token may differ from the reference only where the reference's top-2 log-probs
are within a small margin; from that step on the sequences legitimately diverge and
the rest of that sequence is not compared.

    reference = hf_greedy_reference(model, prompts, max_new_tokens=24)
    ours = [output.token_ids for output in llm.generate(prompts, params)]
    mismatches = compare_greedy(reference.tokens, reference.top2_logprobs, ours,
                                reference_top2_ids=reference.top2_ids)
    assert not mismatches, "\\n".join(mismatches)

Used by the in-process engine tests and by the pipeline-parallel (MPI) tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MARGIN = 0.01  # nats between the reference's top-1 and top-2 log-probs


@dataclass
class GreedyReference:
    """Per prompt: the reference's greedy tokens and, per generated step, its top-2."""

    tokens: list[list[int]]  # [num_prompts][N]
    top2_logprobs: list[np.ndarray]  # [num_prompts] of [N, 2] float64, descending
    top2_ids: list[np.ndarray]  # [num_prompts] of [N, 2] int64
    chosen_logprobs: list[np.ndarray]  # [num_prompts] of [N] float64 (log_softmax of raw logits)


@dataclass
class GreedyComparison:
    mismatches: list[str]  # empty when the outputs agree
    compared: list[int]  # per sequence: how many leading tokens were compared and agree


def hf_greedy_reference(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> GreedyReference:
    """Greedy `generate` of a transformers model, one prompt at a time (no padding).

    End-of-sequence is disabled (like `ignore_eos=True`), so every prompt gets exactly
    `max_new_tokens` tokens and no logits processor touches the scores. The per-step
    log-probs are `log_softmax` of the raw logits (`output_logits=True`).
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        output_logits=True,
        return_dict_in_generate=True,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    # transformers fills unset fields from the model's own generation config: switch
    # its end-of-sequence off too, for the duration of the call
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    reference = GreedyReference([], [], [], [])
    try:
        return _generate_all(model, prompts, max_new_tokens, config, reference)
    finally:
        model.generation_config.eos_token_id = saved_eos


def _generate_all(model, prompts, max_new_tokens, config, reference) -> GreedyReference:
    import torch

    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([list(prompt)], dtype=torch.long)
            result = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
            )
            tokens = result.sequences[0, input_ids.shape[1] :].tolist()
            if len(tokens) != max_new_tokens:
                raise AssertionError(
                    f"reference generated {len(tokens)} tokens, expected {max_new_tokens} "
                    "(did end-of-sequence stop it?)"
                )
            logprobs = torch.log_softmax(
                torch.stack([step[0] for step in result.logits]).double(), dim=-1
            )  # [N, V]
            values, ids = logprobs.topk(2, dim=-1)  # [N, 2]
            chosen = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
            if ids[:, 0].tolist() != tokens:  # a logits processor changed the greedy choice
                raise AssertionError(
                    f"reference tokens {tokens} are not the argmax of its raw logits "
                    f"{ids[:, 0].tolist()}"
                )
            reference.tokens.append(tokens)
            reference.top2_logprobs.append(values.numpy())
            reference.top2_ids.append(ids.numpy())
            reference.chosen_logprobs.append(chosen.numpy())
    return reference


def compare_greedy_detailed(
    reference_tokens: Sequence[Sequence[int]],
    reference_logprobs_top2: Sequence[np.ndarray],
    ours: Sequence[Sequence[int]],
    margin: float = DEFAULT_MARGIN,
    reference_top2_ids: Sequence[np.ndarray] | None = None,
) -> GreedyComparison:
    """Compare sequence by sequence; see `compare_greedy`."""
    if len(reference_tokens) != len(ours):
        return GreedyComparison(
            [f"{len(ours)} outputs for {len(reference_tokens)} reference sequences"], []
        )
    mismatches: list[str] = []
    compared: list[int] = []
    for index, (expected, actual) in enumerate(zip(reference_tokens, ours)):
        expected, actual = list(expected), list(actual)
        top2 = np.asarray(reference_logprobs_top2[index], dtype=np.float64)
        agreed = 0
        for step, (want, got) in enumerate(zip(expected, actual)):
            if want == got:
                agreed += 1
                continue
            gap = float(top2[step, 0] - top2[step, 1])
            second = None
            if reference_top2_ids is not None:
                second = int(reference_top2_ids[index][step, 1])
            if gap >= margin:
                mismatches.append(
                    f"sequence {index} step {step}: expected {want}, got {got} "
                    f"(reference top-2 gap {gap:.4g} >= {margin}); "
                    f"expected {expected[: step + 1]}, got {actual[: step + 1]}"
                )
            elif second is not None and got != second:
                mismatches.append(
                    f"sequence {index} step {step}: expected {want} or near-tie {second}, got {got}"
                )
            break
        else:
            if len(expected) != len(actual):
                mismatches.append(
                    f"sequence {index}: {len(actual)} tokens, reference has {len(expected)} "
                    f"(first {agreed} agree)"
                )
        compared.append(agreed)
    return GreedyComparison(mismatches, compared)


def compare_greedy(
    reference_tokens: Sequence[Sequence[int]],
    reference_logprobs_top2: Sequence[np.ndarray],
    ours: Sequence[Sequence[int]],
    margin: float = DEFAULT_MARGIN,
    reference_top2_ids: Sequence[np.ndarray] | None = None,
) -> list[str]:
    """Mismatch descriptions (empty list: the outputs agree).

    reference_tokens[i]: the reference's greedy tokens for sequence i.
    reference_logprobs_top2[i]: [N, 2] its two best log-probs at each step (descending).
    ours[i]: the tokens to check.
    At the first differing step of a sequence the difference is accepted only if the
    reference's top-2 gap there is below `margin` (and, when `reference_top2_ids` is
    given, our token is the reference's second choice); the rest of that sequence is
    then not compared. Sequences that agree must also have the same length.
    """
    return compare_greedy_detailed(
        reference_tokens, reference_logprobs_top2, ours, margin, reference_top2_ids
    ).mismatches
