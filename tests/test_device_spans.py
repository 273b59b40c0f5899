"""Device spans of the --trace timeline (ppruntime/stage/device_spans.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ppruntime.stage.device_spans import (
    DECODE_SPAN,
    CudaDeviceSpans,
    HostDeviceSpans,
    make_device_spans,
    shared_device_seconds,
)


class _Batch:
    """The ScheduledBatch fields a device span reads: two sequences decoding at 9 and 4."""

    batch_id = 7
    num_seqs = 2
    num_tokens = 2
    starts = np.array([8, 3], dtype=np.int32)
    num_new = np.array([1, 1], dtype=np.int32)


def test_disabled_records_nothing():
    spans = make_device_spans(torch.device("cpu"), enabled=False)
    spans.end(spans.begin(), DECODE_SPAN, _Batch())
    assert spans.events() == []


def test_host_spans_bracket_the_work():
    spans = make_device_spans(torch.device("cpu"), enabled=True)
    assert isinstance(spans, HostDeviceSpans)
    before = time.time()
    mark = spans.begin()
    time.sleep(0.02)
    spans.end(mark, DECODE_SPAN, _Batch())
    [(name, start, end, microbatch, sizes)] = spans.events()
    assert (name, microbatch) == (DECODE_SPAN, 7)
    assert sizes == {"seqs": 2, "tokens": 2, "context_tokens": 13}
    assert before <= start and end - start >= 0.015 and end <= time.time()


def test_ranks_sharing_a_device_share_the_time_their_spans_overlap():
    spans = {0: [(0.0, 2.0), (3.0, 4.0)], 1: [(1.0, 3.0)], 2: [(0.0, 5.0)]}
    # ranks 0 and 1 on one GPU: [1, 2) is open on both, half each; rank 2 on its own
    shared = shared_device_seconds(spans, {0: "gpu0", 1: "gpu0", 2: "gpu1"})
    assert shared == pytest.approx({0: 1.0 + 0.5 + 1.0, 1: 0.5 + 1.0, 2: 5.0})
    assert sum(shared[rank] for rank in (0, 1)) == pytest.approx(4.0)  # the union's length
    apart = shared_device_seconds(spans, {0: "gpu0", 1: "gpu1", 2: "gpu2"})
    assert apart == pytest.approx({0: 3.0, 1: 2.0, 2: 5.0})  # each span whole


def test_a_ranks_own_overlapping_spans_count_once():
    shared = shared_device_seconds({0: [(0.0, 2.0), (1.0, 3.0)], 1: []}, {0: "g", 1: "g"})
    assert shared == pytest.approx({0: 3.0, 1: 0.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CPU path tested above)")
def test_cuda_spans_are_gpu_time_on_the_host_clock():
    device = torch.device("cuda")
    spans = make_device_spans(device, enabled=True)
    assert isinstance(spans, CudaDeviceSpans)
    a = torch.randn(4096, 4096, device=device)
    before = time.time()
    mark = spans.begin()
    for _ in range(20):
        a = a @ a / 64
    spans.end(mark, DECODE_SPAN, _Batch())
    launched = time.time()
    torch.cuda.synchronize()
    [(_, start, end, _, _)] = spans.events()
    # GPU time: the span ends when the GPU finished the matmuls, after their launches
    assert before - 1e-3 <= start <= launched < end <= time.time() + 1e-3
