"""New requests and cancellations on their way down the ranks (DESIGN §2.1).

Rank 0 sends, with an iteration's MICROBATCH header, one control message: a flat
int32 buffer holding, for every new request, its id, prompt length and numeric
sampling parameters, then the cancellations. All the prompts follow in one int32
message, sent straight from the engine's validated copy of each prompt (never a list of
ints, and not copied into the control message). Only what does not fit in numbers (stop
strings, stop token ids, a seed beyond 64 bits) goes in a pickled message, and only
when some request has it. Ranks other than 0 need no request-id strings: rank 0 alone returns
outputs.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import WaitTracker, wait_raw_message, wait_request
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.seq_table import SeqInfo

# per-request words of the control message
(
    F_SEQ_ID,
    F_LENGTH,
    F_MAX_TOKENS,
    F_TOP_K,
    F_LOGPROBS,
    F_FLAGS,
    F_SEED_LO,
    F_SEED_HI,
    F_TEMPERATURE,
    F_TOP_P,
    F_MIN_P,
) = range(11)
FIELDS = 11
HEADER = 4  # new requests, cancellations, has-extras flag, prompt tokens
H_HAS_EXTRAS, H_PROMPT_TOKENS = 2, 3
# flags
HAS_SEED, IGNORE_EOS, PROMPT_LOGITS, GENERATION_LOGITS = 1, 2, 4, 8
_INT64_RANGE = (-(2**63), 2**63)
_NO_TOKENS = np.zeros(0, dtype=np.int32)


@dataclass
class NewRequests:
    """Requests entering in one iteration: all prompts in ONE int32 buffer."""

    seq_ids: np.ndarray  # [N] int64
    request_ids: list[str]
    prompt_lengths: np.ndarray  # [N] int64
    prompt_tokens: np.ndarray  # [sum(lengths)] int32
    params: list[SamplingParams]

    def infos(self) -> list[SeqInfo]:
        """Per-request views into the one prompt buffer (no copies)."""
        infos, start = [], 0
        for seq_id, request_id, length, params in zip(
            self.seq_ids.tolist(), self.request_ids, self.prompt_lengths.tolist(), self.params
        ):
            infos.append(
                SeqInfo(seq_id, request_id, self.prompt_tokens[start : start + length], params)
            )
            start += length
        return infos


@dataclass
class Control:
    """New requests and cancellations, applied by every rank in the same iteration."""

    new: NewRequests | None = None
    aborts: list[int] = field(default_factory=list)  # seq ids


def _encode(control: Control) -> tuple[np.ndarray, dict]:
    """The flat int32 message and the extras that numbers cannot carry."""
    new = control.new
    count = 0 if new is None else len(new.params)
    num_prompt_tokens = 0 if new is None else new.prompt_tokens.shape[0]
    message = np.empty(HEADER + FIELDS * count + len(control.aborts), np.int32)
    extras: dict[int, tuple] = {}
    table = message[HEADER : HEADER + FIELDS * count].reshape(count, FIELDS)
    floats = table.view(np.float32)
    for row, (seq_id, length, params) in enumerate(
        zip(new.seq_ids.tolist(), new.prompt_lengths.tolist(), new.params) if new else ()
    ):
        seed = params.seed
        packed_seed = seed is not None and _INT64_RANGE[0] <= seed < _INT64_RANGE[1]
        flags = (
            (HAS_SEED if packed_seed else 0)
            | (IGNORE_EOS if params.ignore_eos else 0)
            | (PROMPT_LOGITS if params.prompt_logits else 0)
            | (GENERATION_LOGITS if params.generation_logits else 0)
        )
        seed_lo, seed_hi = _split_seed(seed if packed_seed else 0)
        table[row, :F_TEMPERATURE] = (
            seq_id,
            length,
            params.max_tokens,
            params.top_k,
            -1 if params.logprobs is None else params.logprobs,
            flags,
            seed_lo,
            seed_hi,
        )
        floats[row, F_TEMPERATURE:] = (params.temperature, params.top_p, params.min_p)
        if params.stop or params.stop_token_ids or (seed is not None and not packed_seed):
            extras[seq_id] = (params.stop, params.stop_token_ids, None if packed_seed else seed)
    message[:HEADER] = (count, len(control.aborts), bool(extras), num_prompt_tokens)
    message[HEADER + FIELDS * count :] = control.aborts
    return message, extras


def _decode(message: np.ndarray, extras: dict, prompts: np.ndarray) -> Control:
    words = message.tolist()  # a few words per request: cheaper as Python ints
    count, num_aborts = words[0], words[1]
    position = HEADER + FIELDS * count
    aborts = words[position : position + num_aborts]
    if count == 0:
        return Control(new=None, aborts=aborts)
    floats = message[:position].view(np.float32).tolist()
    seq_ids, lengths, params = [], [], []
    for base in range(HEADER, position, FIELDS):
        row = words[base : base + FIELDS]
        flags = row[F_FLAGS]
        stop, stop_ids, big_seed = extras.get(row[F_SEQ_ID], ((), (), None))
        seed = _join_seed(row[F_SEED_LO], row[F_SEED_HI]) if flags & HAS_SEED else big_seed
        seq_ids.append(row[F_SEQ_ID])
        lengths.append(row[F_LENGTH])
        params.append(  # rank 0 validated and normalised every field
            SamplingParams.trusted(
                max_tokens=row[F_MAX_TOKENS],
                temperature=floats[base + F_TEMPERATURE],
                top_k=row[F_TOP_K],
                top_p=floats[base + F_TOP_P],
                min_p=floats[base + F_MIN_P],
                seed=seed,
                stop=stop,
                stop_token_ids=stop_ids,
                ignore_eos=bool(flags & IGNORE_EOS),
                logprobs=None if row[F_LOGPROBS] < 0 else row[F_LOGPROBS],
                prompt_logits=bool(flags & PROMPT_LOGITS),
                generation_logits=bool(flags & GENERATION_LOGITS),
            )
        )
    new = NewRequests(
        seq_ids=np.array(seq_ids, dtype=np.int64),
        request_ids=[str(seq_id) for seq_id in seq_ids],  # rank 0 keeps the names
        prompt_lengths=np.array(lengths, dtype=np.int64),
        prompt_tokens=prompts,
        params=params,
    )
    return Control(new=new, aborts=aborts)


def _split_seed(seed: int) -> tuple[int, int]:
    """A signed 64-bit seed as two signed 32-bit words (low, high)."""
    low = seed & 0xFFFFFFFF
    return (low ^ 0x80000000) - 0x80000000, seed >> 32


def _join_seed(low: int, high: int) -> int:
    return (high << 32) | (low & 0xFFFFFFFF)


def isend_control(
    comm: MPI.Comm, control: Control, dest: int, keep_alive: list[object]
) -> list[MPI.Request]:
    """Start sending `control`; the buffers are appended to `keep_alive`."""
    message, extras = _encode(control)
    keep_alive.append(message)
    requests = [comm.Isend([message, MPI.BYTE], dest, Tag.MICROBATCH_CONTROL)]
    if control.new is not None and control.new.prompt_tokens.shape[0]:
        prompts = np.ascontiguousarray(control.new.prompt_tokens, dtype=np.int32)
        keep_alive.append(prompts)
        requests.append(comm.Isend([prompts, MPI.BYTE], dest, Tag.CONTROL_PROMPTS))
    if extras:
        extra_bytes = np.frombuffer(pickle.dumps(extras, pickle.HIGHEST_PROTOCOL), np.uint8)
        keep_alive.append(extra_bytes)
        requests.append(comm.Isend([extra_bytes, MPI.BYTE], dest, Tag.CONTROL_EXTRAS))
    return requests


def recv_control(comm: MPI.Comm, source: int, tracker: WaitTracker | None = None) -> Control:
    """Receive a control message sent by `isend_control` (the caller knows one is due)."""
    message = wait_raw_message(
        comm,
        source,
        Tag.MICROBATCH_CONTROL,
        f"control from rank {source}",
        dtype=np.int32,
        tracker=tracker,
    )
    prompts = _NO_TOKENS
    if message[H_PROMPT_TOKENS]:  # its size is known: receive without probing
        prompts = np.empty(int(message[H_PROMPT_TOKENS]), dtype=np.int32)
        request = comm.Irecv([prompts, MPI.BYTE], source, Tag.CONTROL_PROMPTS)
        wait_request(request, f"prompts from rank {source}", tracker)
    extras = {}
    if message[H_HAS_EXTRAS]:
        extra_bytes = wait_raw_message(
            comm,
            source,
            Tag.CONTROL_EXTRAS,
            f"control extras from rank {source}",
            dtype=np.uint8,
            tracker=tracker,
        )
        extras = pickle.loads(extra_bytes)
    return _decode(message, extras, prompts)
