"""Token sampling on the logits' own device, with counter-based noise.

Every step's math runs as whole-batch tensor ops on the device the logits are on
(temperature, top-k, top-p, min-p as masks, log-probs), then one noise-and-argmax:
a sampled row takes ``argmax(scores + Gumbel)``, where the Gumbel noise of token ``t``
is a hash of (the row's seed, the position being sampled, ``t``). The noise is a pure
function of those three numbers, with no generator state: a seeded request draws the
same tokens whatever else is in its batch, its row, the batch padding, the chunking of
its prompt, a preemption and recompute, or the pipeline size.

On CUDA the noise-and-argmax is a Triton kernel (ppruntime.kernels.sampling), and
``sample`` never waits on the device: the step's parameters go up in one copy from
pinned memory, the results come back in one asynchronous copy into pinned memory
(`DeviceSample.to_host`), and only `HostTransfer.wait` waits, on that copy's event. On
the CPU the same math runs with the noise computed by `gumbel_noise` (the kernel's
reference: the same bits).

The semantics are those of ppruntime.stage.sampler.Sampler (kept as the test oracle):
greedy rows (temperature below ``SAMPLING_EPS``) take the argmax of the raw logits (ties:
lowest id); sampled rows apply
temperature, then top-k (ties at the k-th value kept), top-p (the most likely token
always kept), min-p (relative to the most likely token), and log-probs are
``log_softmax`` of the RAW logits. Each row's maximum logit comes back too: when it is
not finite (a NaN anywhere in the row, a +inf, no finite logit) the row's token is
meaningless, and the caller ends that request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ppruntime.logs import get_logger
from ppruntime.stage.greedy import SAMPLING_EPS

_log = get_logger("sampler")

MASK32 = 0xFFFFFFFF
_MIX_1, _MIX_2 = 0x21F0AAAD, 0x735A2D97  # both < 2**31: products of 32-bit values fit int64
_KEY_SALT_1, _KEY_SALT_2 = 0x6A09E667, 0xBB67AE85
_UNIFORM_SCALE = 1.0 / (1 << 23)
_EMPTY_ROWS = np.zeros(0, dtype=np.int64)
_GREEDY_ROWS: dict[int, SamplingRows] = {}  # SamplingRows.greedy by number of rows


def mix32(x):
    """A two-round 32-bit integer hash (a bijection) on int64/uint64 arrays of values < 2**32.

    Works on numpy arrays and torch int64 tensors alike; the Triton kernel computes the
    same function in uint32 arithmetic.
    """
    x = x ^ (x >> 16)
    x = (x * _MIX_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_2) & MASK32
    return x ^ (x >> 15)


def seed_key(seed: int) -> int:
    """Any Python int seed (negative or wider than 64 bits) -> its 64-bit key."""
    return seed & (2**64 - 1)


def row_keys(seeds: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two 32-bit keys [N] int64 per row from its 64-bit seed [N] uint64 and position [N]."""
    seeds = seeds.astype(np.uint64, copy=False)
    low = (seeds & np.uint64(MASK32)).astype(np.int64)
    high = (seeds >> np.uint64(32)).astype(np.int64)
    position = positions.astype(np.int64) & MASK32
    key_a = mix32(mix32(mix32(low) ^ high) ^ position)
    key_b = mix32(mix32(mix32(high ^ _KEY_SALT_1) ^ low) ^ position ^ _KEY_SALT_2)
    return key_a, key_b


def gumbel_noise(key_a: torch.Tensor, key_b: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [N, V] float32 of token ids 0..V-1 for rows keyed [N] int64."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=key_a.device)
    bits = mix32((mix32(tokens[None, :] ^ key_a[:, None]) + key_b[:, None]) & MASK32)
    uniform = ((bits >> 9).to(torch.float32) + 0.5) * _UNIFORM_SCALE  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def torch_gumbel_argmax(
    scores: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, noisy: torch.Tensor
) -> torch.Tensor:
    """ppruntime.kernels.sampling.gumbel_argmax in torch (same arguments, same noise bits).

    The noise of `gumbel_noise`, computed in wrapping int32 arithmetic over tiles of
    whole rows small enough to stay in cache, and reduced tile by tile: several times
    faster on a CPU than the int64 form, and no [N, V] noise tensor.
    """
    num_rows, vocab = scores.shape
    tokens = torch.arange(vocab, dtype=torch.int32, device=scores.device)
    key_a32, key_b32 = _as_int32(key_a), _as_int32(key_b)
    noise_scale = noisy.to(torch.float32)
    chosen = torch.empty(num_rows, dtype=torch.int64, device=scores.device)
    rows_per_tile = max(1, _TILE_ELEMENTS // max(vocab, 1))
    for first in range(0, num_rows, rows_per_tile):
        rows = slice(first, first + rows_per_tile)
        bits = tokens[None, :] ^ key_a32[rows, None]
        _mix32_int32_(bits)
        bits += key_b32[rows, None]
        _mix32_int32_(bits)
        bits >>= 9
        bits &= 0x7FFFFF
        noise = bits.to(torch.float32)
        noise += 0.5
        noise *= _UNIFORM_SCALE
        noise.log_().neg_().log_().neg_()  # Gumbel: -log(-log(u))
        noise *= noise_scale[rows, None]  # greedy rows: no noise
        noise += scores[rows]
        chosen[rows] = noise.argmax(dim=1)
    return chosen


_TILE_ELEMENTS = 1 << 16


def _as_int32(keys: torch.Tensor) -> torch.Tensor:
    """int64 values < 2**32 -> the int32 with the same low 32 bits."""
    return torch.where(keys >= 2**31, keys - 2**32, keys).to(torch.int32)


def _mix32_int32_(x: torch.Tensor) -> None:
    """mix32 in place on int32 bits (multiplication wraps; shifts made logical by masks)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _MIX_1
    x ^= (x >> 15) & 0x1FFFF
    x *= _MIX_2
    x ^= (x >> 15) & 0x1FFFF


@dataclass
class SamplingRows:
    """Per-row sampling parameters of one step (host arrays, built by the caller)."""

    temperature: np.ndarray  # [N] float32, 0 = greedy
    top_k: np.ndarray  # [N] int32, 0 (or -1) = off
    top_p: np.ndarray  # [N] float32, 1 = off
    min_p: np.ndarray  # [N] float32, 0 = off
    seeds: np.ndarray  # [N] uint64: seed keys (seed_key) of the rows
    positions: np.ndarray  # [N] int64: position of the token each row samples
    num_logprobs: int = 0  # top-n log-probs (plus the chosen token's) of every row; 0 = none
    logit_rows: np.ndarray = field(default_factory=lambda: _EMPTY_ROWS)  # [G] rows' raw logits
    # made by `greedy`: every row greedy, nothing else asked (logits in any float dtype)
    plain_greedy: bool = False

    @classmethod
    def greedy(cls, num_rows: int) -> SamplingRows:
        """Plain greedy rows (shared per size: the sampler only reads them)."""
        rows = _GREEDY_ROWS.get(num_rows)
        if rows is None:
            rows = _GREEDY_ROWS[num_rows] = cls._make_greedy(num_rows)
        return rows

    @classmethod
    def _make_greedy(cls, num_rows: int) -> SamplingRows:
        zeros = np.zeros(num_rows, dtype=np.float32)
        rows = cls(
            temperature=zeros,
            top_k=np.zeros(num_rows, dtype=np.int32),
            top_p=np.ones(num_rows, dtype=np.float32),
            min_p=zeros,
            seeds=np.zeros(num_rows, dtype=np.uint64),
            positions=np.zeros(num_rows, dtype=np.int64),
            plain_greedy=True,
        )
        for array in (rows.temperature, rows.top_k, rows.top_p, rows.seeds, rows.positions):
            array.setflags(write=False)
        return rows


@dataclass
class HostSample:
    """A step's results on the host (numpy)."""

    token_ids: np.ndarray  # [N] int32
    logprobs: np.ndarray | None  # [N] float32, chosen token's log-prob
    top_token_ids: np.ndarray | None  # [N, K] int32, sorted by log-prob descending
    top_logprobs: np.ndarray | None  # [N, K] float32
    logits: np.ndarray | None  # [G, V] float32: raw logits of SamplingRows.logit_rows
    max_logits: np.ndarray | None = None  # [N] float32: each row's maximum (NaN propagates)

    def nonfinite_rows(self) -> np.ndarray | None:
        """[N] bool rows whose logits hold a NaN or an inf; None when every row is fine."""
        if self.max_logits is None:
            return None
        finite = np.isfinite(self.max_logits)
        return None if finite.all() else ~finite


_FIELDS = ("token_ids", "logprobs", "top_token_ids", "top_logprobs", "logits", "max_logits")


class HostTransfer:
    """An asynchronous device-to-host copy of a DeviceSample; `wait` gives the arrays."""

    def __init__(
        self,
        host: torch.Tensor | None,
        event,
        layout: list[tuple[str, tuple, np.dtype]],
        result: HostSample | None = None,
    ) -> None:
        self._host = host  # pinned int32, every result packed one after the other
        self._event = event
        self._layout = layout
        self._result = result  # already there (CPU)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> HostSample:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            flat = self._host.numpy().reshape(-1)
            arrays: dict[str, np.ndarray] = {}
            offset = 0
            for name, shape, dtype in self._layout:
                size = int(np.prod(shape))
                arrays[name] = flat[offset : offset + size].view(dtype).reshape(shape)
                offset += size
            self._result = HostSample(
                token_ids=arrays["token_ids"],
                logprobs=arrays.get("logprobs"),
                top_token_ids=arrays.get("top_token_ids"),
                top_logprobs=arrays.get("top_logprobs"),
                logits=arrays.get("logits"),
                max_logits=arrays.get("max_logits"),
            )
        return self._result


@dataclass
class DeviceSample:
    """A step's results, still on the logits' device (nothing has waited for them)."""

    token_ids: torch.Tensor  # [N] int32
    logprobs: torch.Tensor | None  # [N] float32
    top_token_ids: torch.Tensor | None  # [N, K] int32
    top_logprobs: torch.Tensor | None  # [N, K] float32
    logits: torch.Tensor | None  # [G, V] float32
    max_logits: torch.Tensor | None = None  # [N] float32
    # [2, N] int32 whose rows are token_ids and max_logits' bits, when nothing else
    # came back (plain greedy): copied to the host as it is
    packed: torch.Tensor | None = None

    def _parts(self) -> list[tuple[str, torch.Tensor]]:
        named = [
            ("token_ids", self.token_ids),
            ("logprobs", self.logprobs),
            ("top_token_ids", self.top_token_ids),
            ("top_logprobs", self.top_logprobs),
            ("logits", self.logits),
            ("max_logits", self.max_logits),
        ]
        return [(name, tensor) for name, tensor in named if tensor is not None]

    def to_host(self) -> HostTransfer:
        """Start the copy to the host: one packed copy into pinned memory, then an event."""
        parts = self._parts()
        if self.token_ids.device.type == "cpu":
            arrays = {name: tensor.numpy() for name, tensor in parts}
            return HostTransfer(None, None, [], HostSample(**{**dict.fromkeys(_FIELDS), **arrays}))
        layout = [
            (name, tuple(tensor.shape), np.dtype(np.int32 if name.endswith("ids") else np.float32))
            for name, tensor in parts
        ]
        packed = self.packed  # its rows are the parts, in this order
        if packed is None:
            packed = torch.cat([tensor.reshape(-1).view(torch.int32) for _, tensor in parts])
        host = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostTransfer(host, event, layout)


class DeviceSampler:
    """Samples one token per row of ``[N, V]`` float32 logits, on their device (a
    plain greedy step, `SamplingRows.greedy`, takes them in any float dtype).

    ``noise`` picks the noise-and-argmax implementation: "triton" (the default on CUDA;
    on CPU tensors only under TRITON_INTERPRET=1, for tests) or "torch" (the default
    elsewhere). Both draw the same noise.
    """

    def __init__(self, noise: str | None = None) -> None:
        if noise not in (None, "torch", "triton"):
            raise ValueError(f"noise must be 'torch' or 'triton', got {noise!r}")
        self.noise = noise
        self._triton_argmax = None

    # -- the whole step -------------------------------------------------------------
    def sample(self, logits: torch.Tensor, rows: SamplingRows) -> DeviceSample:
        num_rows = logits.shape[0]
        greedy_rows = rows.temperature < SAMPLING_EPS  # [N] host bool
        packed = None
        if greedy_rows.all():
            token_ids, max_logits, packed = self._greedy(logits)
        else:
            params = _upload_params(rows, greedy_rows, logits.shape[1], logits.device)
            scores = _filtered_scores(logits, params)
            token_ids = self._noise_argmax(logits.device)(
                scores, params.key_a, params.key_b, params.noisy
            )
            max_logits = logits.amax(dim=-1)
        logprobs = top_ids = top_values = None
        if rows.num_logprobs > 0:
            packed = None  # more than ids and maxima come back
            all_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
            logprobs = all_logprobs.gather(1, token_ids.to(torch.int64).unsqueeze(1)).squeeze(1)
            k = min(rows.num_logprobs, logits.shape[1])
            top_values, top_ids = all_logprobs.topk(k, dim=-1)  # [N, K], sorted descending
            top_ids = top_ids.to(torch.int32)
        requested_logits = None
        if rows.logit_rows.shape[0]:
            packed = None
            if rows.logit_rows.shape[0] == num_rows:
                requested_logits = logits
            else:
                index = _to_device(rows.logit_rows.astype(np.int64), logits.device)
                requested_logits = logits.index_select(0, index)
        return DeviceSample(
            token_ids if token_ids.dtype == torch.int32 else token_ids.to(torch.int32),
            logprobs,
            top_ids,
            top_values,
            requested_logits,
            max_logits if max_logits.dtype == torch.float32 else max_logits.to(torch.float32),
            packed=packed,
        )

    def _greedy(
        self, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(argmax, each row's maximum: not finite when the row holds a NaN or +inf,
        and the two packed in one [2, N] int32 tensor when the kernel made it so)."""
        if self._noise_argmax(logits.device) is torch_gumbel_argmax:
            if logits.dtype != torch.float32:  # a plain greedy step's model-dtype logits
                logits = logits.float()
            token_ids = _argmax(logits)
            # argmax picks the first NaN and any +inf: the chosen values are the maxima
            maxima = logits.gather(1, token_ids.to(torch.int64).unsqueeze(1)).squeeze(1)
            return token_ids, maxima, None
        from ppruntime.kernels.sampling import greedy_sample  # triton is there

        packed = greedy_sample(logits)
        return packed[0], packed[1].view(torch.float32), packed

    def _noise_argmax(self, device: torch.device):
        noise = self.noise or ("triton" if device.type == "cuda" else "torch")
        if noise == "torch":
            return torch_gumbel_argmax
        if self._triton_argmax is None:
            try:
                from ppruntime.kernels.sampling import gumbel_argmax
            except ImportError as exc:  # a CUDA build of torch without triton
                if self.noise == "triton":
                    raise
                _log.warning("triton unavailable (%s): sampling noise computed with torch", exc)
                gumbel_argmax = torch_gumbel_argmax  # the same noise, more kernels
            self._triton_argmax = gumbel_argmax
        return self._triton_argmax


@dataclass
class _DeviceParams:
    """The step's parameters on the device (greedy rows: temperature 1, no filters)."""

    temperature: torch.Tensor  # [N, 1] float32
    top_k_index: torch.Tensor  # [N, 1] int64: k - 1 (inactive rows: k_max - 1)
    top_k_active: torch.Tensor  # [N, 1] bool
    k_max: int  # the largest active k (0: no row uses top-k); every active k < vocab
    top_p: torch.Tensor  # [N, 1] float32
    top_p_active: torch.Tensor  # [N, 1] bool
    any_top_p: bool
    min_p: torch.Tensor  # [N, 1] float32
    any_min_p: bool
    key_a: torch.Tensor  # [N] int64
    key_b: torch.Tensor  # [N] int64
    noisy: torch.Tensor  # [N] int32: 1 = sampled row


def _upload_params(
    rows: SamplingRows, greedy_rows: np.ndarray, vocab: int, device: torch.device
) -> _DeviceParams:
    """Every per-row parameter in one float64 array, one copy (all values exact in float64)."""
    top_k = np.where(greedy_rows, 0, rows.top_k).astype(np.int64)
    top_k_active = (top_k > 0) & (top_k < vocab)  # k >= vocab keeps every token
    k_max = int(top_k[top_k_active].max()) if top_k_active.any() else 0
    top_p = np.where(greedy_rows, 1.0, rows.top_p)
    min_p = np.where(greedy_rows, 0.0, rows.min_p)
    key_a, key_b = row_keys(rows.seeds, rows.positions)
    table = np.stack(
        [
            np.where(greedy_rows, 1.0, rows.temperature),
            np.where(top_k_active, top_k, max(k_max, 1)) - 1,
            top_k_active,
            top_p,
            min_p,
            key_a,
            key_b,
            ~greedy_rows,
        ]
    ).astype(np.float64)  # [8, N]
    on_device = _to_device(table, device)
    column = on_device.unsqueeze(2)  # [8, N, 1]
    return _DeviceParams(
        temperature=column[0].to(torch.float32),
        top_k_index=column[1].to(torch.int64),
        top_k_active=column[2].bool(),
        k_max=k_max,
        top_p=column[3].to(torch.float32),
        top_p_active=column[3] < 1.0,
        any_top_p=bool((top_p < 1.0).any()),
        min_p=column[4].to(torch.float32),
        any_min_p=bool((min_p > 0.0).any()),
        key_a=on_device[5].to(torch.int64),
        key_b=on_device[6].to(torch.int64),
        noisy=on_device[7].to(torch.int32),
    )


def sampling_scores(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """What the noise is added to: [N, V] scaled logits, the tokens that top-k, top-p and
    min-p drop at -inf; greedy rows: their raw logits."""
    greedy_rows = rows.temperature < SAMPLING_EPS
    return _filtered_scores(
        logits, _upload_params(rows, greedy_rows, logits.shape[1], logits.device)
    )


def _filtered_scores(logits: torch.Tensor, params: _DeviceParams) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.k_max:
        top_values = scaled.topk(params.k_max, dim=-1).values  # [N, k_max] descending
        threshold = top_values.gather(1, params.top_k_index)  # [N, 1] k-th largest
        keep = (scaled >= threshold) | ~params.top_k_active  # ties at the threshold are kept
        scaled = scaled.masked_fill(~keep, -float("inf"))
    if params.any_top_p:
        sorted_scores, order = scaled.sort(dim=-1, descending=True)  # [N, V]
        sorted_probs = sorted_scores.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of better-ranked
        drop_sorted = mass_before >= params.top_p
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop_sorted &= params.top_p_active
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -float("inf"))
    if params.any_min_p:
        probs = scaled.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * params.min_p
        scaled = scaled.masked_fill(probs < threshold, -float("inf"))
    return scaled


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.device.type == "cpu":
        # numpy's argmax is an order of magnitude faster than torch's on CPU; both
        # return the first maximum
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(dim=-1)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`; from pinned memory without waiting, on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    staged.copy_(tensor)
    return staged.to(device, non_blocking=True)
