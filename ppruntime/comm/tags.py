"""Message tags: one value per kind of message, disjoint across kinds.

Every point-to-point message in ppruntime carries one of these tags, so a receiver
posted for one kind can never take a message of another kind, whichever
communicator the two share.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class Tag(IntEnum):
    # executor loop, pipeline communicator (main thread)
    MICROBATCH = 11  # fixed header + packed schedule (int32 raw buffer)
    MICROBATCH_CONTROL = 12  # new requests and cancellations (flat int32 buffer)
    ACTIVATIONS = 13  # hidden states of a microbatch (raw buffer)
    CONTROL_EXTRAS = 14  # stop strings / stop ids of new requests, when any (pickled)
    CONTROL_PROMPTS = 15  # the new requests' prompts, concatenated (int32 raw buffer)
    # relay thread, relay communicator
    SAMPLE_STATE = 21  # sampled tokens and finish codes of one batch (int32 raw buffer)
    RESPONSE_DIFF = 22  # log-probs, logits, stop reasons of one batch (pickled)
    PAYLOAD_SLICE = 23  # one slice of a large response-diff array
    # watchdog thread, watchdog communicator: diagnosis and rank statistics
    WATCHDOG_DUMP = 41  # "dump your stack": stall diagnosis request
    WATCHDOG_REPLY = 42
    RANK_STATS = 43  # a rank's busy time for rank 0's /metrics (float64 raw buffer)
    # start-up and shutdown exchanges with a deadline (comm.bounded)
    EXCHANGE = 51
