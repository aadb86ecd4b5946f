"""Head- and layer-averaged attention maps of the policy, without eager attention.

Flow credit needs ``Ā[n, q, k]``: the attention of query ``q`` on key ``k``, averaged over the heads
and over a few middle layers ``Λ``. Switching the model to eager attention with
``output_attentions=True`` would keep ``layers × heads × T²`` probabilities alive. Instead, for the
duration of one pass the model is switched to a registered attention implementation that

* runs the model's own kernel for every layer (``sdpa``, or the model's ``eager`` function when
  the model was loaded with eager), so the pass computes exactly what it computes without capture;
* for the layers in ``Λ`` only, also recomputes ``softmax(Q Kᵀ · scaling + mask)`` from the query and
  key it is handed (already projected, normed and rotary-embedded by the model), one head at a
  time, and adds the head's map into a running ``[n, T, T]`` float32 sum as soon as it exists;
* optionally raises a private exception right after the last layer of ``Λ``, so later layers, the
  final norm and the LM head never run.

Supported: decoder models whose attention modules dispatch through
``transformers.AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS.get_interface``; Llama, Qwen2/3,
Mistral, Gemma, Phi3 and most current ones), have a ``layer_idx`` and are loaded with ``sdpa``,
``eager`` or any other implementation (flash / flex passes then run through ``sdpa`` while recording,
which is the same math up to rounding). Masks (padding, sliding windows) are the ones transformers
builds for ``sdpa`` (boolean, or None when plainly causal) or ``eager`` (additive); logit
soft-capping is applied as eager does. Not supported, with an error rather than a wrong map: a
model that does not dispatch through the interface (``RuntimeError`` on entering the recorder), sink
logits (``s_aux``/``sinks``, gpt-oss: ``NotImplementedError``), a pass over a filled KV cache
(``RuntimeError``), and on an ``sdpa`` model whatever the ``sdpa`` integration itself refuses
(``softcap``: ``ValueError``; load such a model with eager).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lightning_flow.internals import attention_implementation, in_backward, profiler_enabled

__all__ = ["PROFILER_RANGE", "AttentionRecorder", "Stopwatch", "capture_attention", "default_capture_layers"]

PROFILER_RANGE = "lightning_flow.capture"
"""torch.profiler range around each recorded layer's recording."""

_SDPA_NAME = "lightning_flow_capture_sdpa"
"""Registered implementation that records and delegates to ``sdpa`` (with sdpa's boolean masks)."""
_EAGER_NAME = "lightning_flow_capture_eager"
"""Registered implementation that records and delegates to the model's eager function (additive masks)."""

_ACTIVE: dict[int, AttentionRecorder] = {}
"""Recorders in use, keyed by ``id(config)`` of every config of the recorded model."""


_MIN_CHUNK_ELEMENTS = 2**18
"""Score elements a recorded chunk may always use (1 MiB in float32), however small the map: short sequences
take all heads in one product."""
_CAUSAL_SPLIT = 256
"""Causal layers with this many query rows or more are recorded in at least 4 row chunks (see ``_record``)."""


class _StopForward(Exception):
    """Raised after the last recorded layer to end the pass; caught by the recorder."""


def default_capture_layers(num_layers: int, count: int = 5) -> list[int]:
    """`count` layer indices evenly spaced over [floor(L/3), floor(2L/3)] (deduplicated, sorted; fewer when
    the range is smaller).

    Positions ``lo + i·(hi − lo)/(count − 1)`` are rounded half up, in integer arithmetic. Examples:
    L=5 -> [1, 2, 3]; L=28 -> [9, 11, 14, 16, 18]; L=36 -> [12, 15, 18, 21, 24]; L=1 -> [0].
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: a model has at least one layer")
    if count < 1:
        raise ValueError(f"count={count}: at least one layer must be captured")
    lo, hi = num_layers // 3, (2 * num_layers) // 3
    if count == 1:
        return [(lo + hi + 1) // 2]
    steps = count - 1
    return sorted({lo + (2 * i * (hi - lo) + steps) // (2 * steps) for i in range(count)})


def _outermost_pretrained(model: nn.Module) -> PreTrainedModel:
    """The first ``PreTrainedModel`` in ``model.modules()``: the model itself, or the one a PeftModel
    wraps."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise TypeError(
        f"{type(model).__name__} contains no transformers PreTrainedModel; attention capture needs one"
    )


def _all_configs(top: PreTrainedModel) -> list[Any]:
    """Every config whose attention implementation a switch may change (models, sub-models, sub-configs)."""
    found: dict[int, Any] = {}
    pending = [m.config for m in top.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                pending.append(sub)
    return list(found.values())


_EAGER_FUNCTIONS: dict[type, Callable] = {}


def _eager_function_of(module: nn.Module) -> Callable:
    """The model family's own ``eager_attention_forward`` (defined beside the attention class)."""
    cls = type(module)
    if cls not in _EAGER_FUNCTIONS:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(
                f"{cls.__module__} defines no eager_attention_forward; load the model with "
                "attn_implementation='sdpa' to capture its attention"
            )
        _EAGER_FUNCTIONS[cls] = fn
    return _EAGER_FUNCTIONS[cls]


def _recording_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *args,
    **kwargs,
):
    """The registered attention function: record the selected layers, delegate every layer to the real
    kernel."""
    recorder = _ACTIVE.get(id(getattr(module, "config", None)))
    eager = recorder._eager if recorder is not None else False
    if recorder is not None and recorder._wants(getattr(module, "layer_idx", None)):
        # autocast off: the maps are float32 products even inside a bf16-mixed step; the named
        # range lets a profiler tell the recording's host time from its kernels' time (each context
        # entered only where it acts: entering it costs time on every recorded layer of every step)
        autocast = torch.is_autocast_enabled(query.device.type)
        profiling = profiler_enabled()
        with (
            recorder.stopwatch(query.device),
            torch.autocast(query.device.type, enabled=False) if autocast else nullcontext(),
            record_function(PROFILER_RANGE) if profiling else nullcontext(),
        ):
            recorder._record(module, query, key, attention_mask, kwargs)
        if (recorder.stop_after_last or recorder._stop_pass) and module.layer_idx == recorder.layers[-1]:
            raise _StopForward
    delegate = _eager_function_of(module) if eager else sdpa_attention_forward
    return delegate(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    if _SDPA_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_SDPA_NAME, _recording_attention)
        # the boolean masks sdpa gets (None when plainly causal)
        AttentionMaskInterface.register(_SDPA_NAME, sdpa_mask)
    if _EAGER_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_EAGER_NAME, _recording_attention)
        AttentionMaskInterface.register(_EAGER_NAME, eager_mask)  # the additive float masks eager gets


class Stopwatch:
    """Accumulated wall time of the timed blocks (``with stopwatch(device): ...``, one at a time);
    CUDA work is timed with events (no stall), read at ``seconds()``. A plain class rather than a
    generator context manager: it times every recorded layer, where each call's overhead shows."""

    def __init__(self) -> None:
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cuda = False  # the current block's device is a GPU
        self._began: float | torch.cuda.Event = 0.0

    def __call__(self, device: torch.device) -> Stopwatch:
        self._cuda = device.type == "cuda"
        return self

    def __enter__(self) -> None:
        if self._cuda:
            self._began = torch.cuda.Event(enable_timing=True)
            self._began.record()
        else:
            self._began = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._began, end))
        else:
            self._host_seconds += time.perf_counter() - self._began

    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._host_seconds += start.elapsed_time(end) / 1000
        self._events = []
        return self._host_seconds


class AttentionRecorder:
    """Record head- and layer-mean attention maps while the model runs its normal forward.

    ::

        with AttentionRecorder(model, layers, stop_after_last=False) as rec:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        maps = rec.take()  # [n, T, T] float32 (also callable inside the `with`)

    With ``stop_after_last=True`` the pass ends right after the last layer of ``layers``: a plain
    ``model(...)`` call inside the ``with`` then leaves the block (the recorder swallows its private
    exception); use :meth:`run` to make several such passes in one block.

    Every forward that reaches all of ``layers`` (they run in increasing order) yields one map;
    :meth:`take` returns the maps of the forwards since the last ``take``, concatenated along the
    batch. Rows of padded queries and columns of padded keys are exactly 0 (padding is read from the
    diagonal of the 4D mask the model builds, and from ``take(attention_mask=...)`` when given); other
    rows sum to 1 over the keys they may attend to. Calls made by a backward (checkpoint recompute)
    are ignored.

    A recorder may be entered again once its block has ended (one block at a time): each block
    starts with no maps and a fresh ``stopwatch``, and a caller that records every step keeps one.

    On entry the outermost ``PreTrainedModel`` (the one a ``PeftModel`` wraps) is switched with
    ``set_attn_implementation`` to a registered recording implementation; on exit, normal or by any
    exception, the attention implementation of every config of the model is written back as it was.
    Only a no-grad copy of each map is kept: the recorded pass's own outputs and gradients are
    those of the original implementation.

    Memory: one ``[n, T, T]`` float32 sum per forward not yet taken (or the ``out`` buffer given to
    :meth:`run`), plus while a recorded layer runs one chunk of scores and its probabilities (heads ×
    query rows, together at most a 32nd of ``[n, T, T]`` or 2 MiB, see ``_chunk_shape``), the
    chunk of the mask it reads and float32 copies of the chunk's query and key.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], stop_after_last: bool = False):
        self.model = model
        self.layers: tuple[int, ...] = tuple(sorted({int(layer) for layer in layers}))
        if not self.layers:
            raise ValueError("layers is empty: name at least one layer to capture")
        self.stop_after_last = stop_after_last
        self._top = _outermost_pretrained(model)
        num_layers = getattr(self._top.config.get_text_config(), "num_hidden_layers", None)
        if self.layers[0] < 0 or (num_layers is not None and self.layers[-1] >= num_layers):
            raise ValueError(
                f"layers={list(self.layers)}: the model has layers 0..{num_layers - 1 if num_layers else '?'}"
            )
        self._eager = False
        self._original: str | None = None  # the model's attention implementation, put back on exit
        self._configs: list[Any] = []  # every config of the model, keys of _ACTIVE while recording
        self._entered = False
        self._done: list[Tensor] = []
        self._next_out: Tensor | None = None
        self._next_rows: Tensor | None = None
        self._stop_pass = False  # end the current pass after the last recorded layer (run's `stop`)
        self.stopwatch = Stopwatch()
        """Time spent recording (the computation of the maps, not the pass itself)."""
        self._reset_pass()

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        if self._entered:
            raise RuntimeError("this AttentionRecorder is already in use")
        self._done, self.stopwatch = [], Stopwatch()  # a recorder entered again starts afresh
        self._reset_pass()
        _register()
        self._original = attention_implementation(self._top.config)
        self._eager = self._original in ("eager", "paged|eager")
        name = _EAGER_NAME if self._eager else _SDPA_NAME
        configs = _all_configs(self._top)
        if any(id(c) in _ACTIVE for c in configs):
            raise RuntimeError("another AttentionRecorder is already recording this model")
        for config in configs:
            _ACTIVE[id(config)] = self
        self._configs, self._entered = configs, True
        try:
            self._top.set_attn_implementation(name)
            if attention_implementation(self._top.config) != name:
                raise RuntimeError(
                    f"{type(self._top).__name__} does not dispatch its attention through transformers' "
                    "AttentionInterface, so its attention cannot be captured without eager attention"
                )
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return exc_type is not None and issubclass(exc_type, _StopForward)

    def _restore(self) -> None:
        try:
            if attention_implementation(self._top.config) != self._original:
                self._top.set_attn_implementation(self._original)
        finally:
            for config in self._configs:
                _ACTIVE.pop(id(config), None)
            self._configs, self._entered = [], False

    # -- passes ---------------------------------------------------------------------------------
    def run(
        self,
        *args,
        forward: Callable | None = None,
        out: Tensor | None = None,
        rows: Tensor | None = None,
        stop: bool = False,
        **kwargs,
    ):
        """Call the model (or ``forward``, a part of it that runs the recorded layers, such as its
        decoder stack) once inside the ``with``; returns its output, or None when the pass was stopped early.

        ``rows``: optional ``[k]`` indices of the batch rows to record (the others cost nothing);
        the pass's map then holds those k rows, in that order.
        ``out``: an optional ``[k, T, T]`` float32 buffer on the model's device (k: the recorded
        rows) that this pass's map is accumulated into (it is zeroed first and later returned by
        :meth:`take`).
        ``stop``: end this pass right after the last recorded layer (as ``stop_after_last`` does for every
        pass).
        """
        if not self._entered:
            raise RuntimeError("AttentionRecorder.run must be called inside its `with` block")
        self._next_out, self._next_rows, self._stop_pass = out, rows, stop
        try:
            return (forward or self.model)(*args, **kwargs)
        except _StopForward:
            return None
        finally:
            self._next_out = self._next_rows = None
            self._stop_pass = False

    def take(self, attention_mask: Tensor | None = None) -> Tensor:
        """Maps of the forwards completed since the last ``take``: ``[n, T, T]`` float32; resets.

        ``attention_mask`` ([n, T], optional): zero the rows and columns of its padded positions too.
        """
        maps = self._collect()
        self._done = []
        if attention_mask is not None:
            valid = attention_mask.to(device=maps.device, dtype=torch.bool)
            maps.mul_(valid[:, :, None]).mul_(valid[:, None, :])
        return maps

    def _collect(self) -> Tensor:
        if not self._done:
            if self._seen:
                missing = [layer for layer in self.layers if layer not in self._seen]
                raise RuntimeError(
                    f"the last forward stopped before capturing layers {missing} of {list(self.layers)}"
                )
            raise RuntimeError(
                "no attention was captured: run the model inside the recorder's `with` block "
                "(its attention modules must dispatch through transformers' AttentionInterface and have "
                "layer_idx)"
            )
        return self._done[0] if len(self._done) == 1 else torch.cat(self._done)

    # -- called from the attention function -------------------------------------------------------
    def _reset_pass(self) -> None:
        self._seen: list[int] = []
        self._sum: Tensor | None = None
        self._valid: Tensor | None = None
        self._rows: Tensor | None = None  # the batch rows this forward records (None: all)

    def _wants(self, layer: int | None) -> bool:
        if layer is None or layer not in self.layers or in_backward():
            return False
        if self._seen and layer <= self._seen[-1]:
            self._reset_pass()  # layers only increase within a forward: this is a new forward
        return True

    @torch.no_grad()
    def _record(
        self, module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, kwargs: dict
    ) -> None:
        n, heads, t_q, head_dim = query.shape
        t_k = key.shape[2]
        if t_q != t_k:
            raise RuntimeError(
                f"attention capture needs a full pass without a filled KV cache (got {t_q} queries and {t_k} "
                "keys); "
                "pass use_cache=False"
            )
        if self._sum is None:  # first recorded layer of this forward
            self._rows = self._next_rows
            k = n if self._rows is None else len(self._rows)
            self._sum = (
                self._next_out
                if self._next_out is not None
                else torch.empty(k, t_q, t_k, dtype=torch.float32, device=query.device)
            )
            self._sum.zero_()
            self._valid = _batch_rows(self._valid_positions(attention_mask, n, t_q, query.device), self._rows)
        rows = self._rows
        if rows is not None:  # only these batch rows are recorded; the others' maps stay zero
            query, key = query.index_select(0, rows), key.index_select(0, rows)
        group = heads // key.shape[1]
        scaling = kwargs.get("scaling")
        scaling = head_dim**-0.5 if scaling is None else scaling
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", None)  # None: the layer does not say
        # Masks are read a chunk at a time (never copied whole: a [n, 1, T, T] copy would cost a map
        # or a quarter of one): a boolean mask (sdpa) fills forbidden scores with the lowest float, an
        # additive one (eager) is added, and no mask means causal unless the layer says otherwise.
        allowed = additive = None
        if attention_mask is None:
            plain_causal = is_causal is not False and t_q > 1
        elif attention_mask.dtype == torch.bool:
            allowed, plain_causal = attention_mask, False
        else:
            additive, plain_causal = attention_mask, False
        # A layer that declares itself causal: its query rows r0:r1 see keys :r1 only, so a chunk of
        # rows skips the keys after it: 4 chunks score 10/16 of the square, many chunks about half
        # (short sequences stay whole, where a chunk's fixed cost outweighs what it skips).
        causal = is_causal is True
        position_bias = kwargs.get("position_bias")
        softcap = kwargs.get("softcap")
        if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise NotImplementedError(
                f"{type(module).__name__} uses attention sink logits, which attention capture does not model"
            )

        # The lowest float instead of -inf: a fully masked (padded) row then gives a uniform row
        # instead of NaN, and padded rows are zeroed at the end anyway.
        lowest = torch.finfo(torch.float32).min
        weight = 1.0 / (heads * len(self.layers))
        head_step, row_step = _chunk_shape(len(query), heads, t_q, t_k)
        if causal and t_q >= _CAUSAL_SPLIT:
            row_step = min(row_step, -(-t_q // 4))
        for h0 in range(0, heads if len(query) else 0, head_step):
            h1 = min(h0 + head_step, heads)
            if group == 1:
                k_chunk = key[:, h0:h1]
            else:  # grouped-query attention: query head h reads key head h // group
                k_chunk = key.index_select(1, torch.arange(h0, h1, device=key.device) // group)
            # Scaling folded into the keys and queries made float32 once per head chunk (not per row
            # chunk): each row chunk then launches only its product, mask, softmax and sum, which
            # matters on a GPU, where a long sequence's many small chunks are launch-bound.
            k_t = (k_chunk.float() * scaling).transpose(-1, -2)  # [n, hc, d, T]
            q_chunk = query[:, h0:h1].float()  # [n, hc, T, d]
            for r0 in range(0, t_q, row_step):
                r1 = min(r0 + row_step, t_q)
                c1 = r1 if causal else t_k  # keys this chunk's queries may see
                scores = torch.matmul(q_chunk[:, :, r0:r1], k_t[..., :c1])  # [n, hc, r, c1]
                if softcap is not None:  # as the eager functions of models with logit soft-capping (Gemma 2)
                    scores.div_(softcap).tanh_().mul_(softcap)
                if position_bias is not None:
                    scores.add_(_chunk(position_bias, rows, h0, h1, r0, r1, c1))
                if additive is not None:
                    # -inf in a mask stays finite
                    scores.add_(_chunk(additive, rows, h0, h1, r0, r1, c1)).clamp_min_(lowest)
                if allowed is not None:
                    scores.masked_fill_(~_chunk(allowed, rows, h0, h1, r0, r1, c1), lowest)
                elif plain_causal:  # query r0 + j sees keys up to r0 + j
                    scores.masked_fill_(
                        torch.ones(r1 - r0, c1, dtype=torch.bool, device=scores.device).triu_(r0 + 1), lowest
                    )
                # fused: fewer passes over the chunk than an in-place softmax
                probs = torch.softmax(scores, dim=-1)
                del scores
                head_sum = probs[:, 0] if h1 - h0 == 1 else probs.sum(1)  # [n or k, r, c1]
                del probs
                self._sum[:, r0:r1, :c1].add_(head_sum, alpha=weight)
        self._seen.append(module.layer_idx)
        if tuple(self._seen) == self.layers:
            # Padded keys got probability exactly 0 from the mask in every row; a padded query's row
            # (all its keys masked: uniform) is zeroed here, by a multiply (cheaper than masked_fill on a
            # CPU).
            self._sum.mul_(self._valid.to(self._sum.dtype)[:, :, None])
            self._done.append(self._sum)
            self._reset_pass()

    @staticmethod
    def _valid_positions(attention_mask: Tensor | None, n: int, t: int, device: torch.device) -> Tensor:
        """[n, T] bool: a causal token may always see itself, so a masked diagonal marks padding."""
        if attention_mask is None:
            return torch.ones(n, t, dtype=torch.bool, device=device)
        diagonal = torch.diagonal(attention_mask[:, 0], dim1=-2, dim2=-1)
        if diagonal.dtype != torch.bool:
            diagonal = diagonal > torch.finfo(diagonal.dtype).min / 2
        return diagonal.expand(n, t)


def _chunk_shape(n: int, heads: int, t_q: int, t_k: int) -> tuple[int, int]:
    """(heads, query rows) per chunk of the recorded scores: a [n, heads, rows, T] block holds at
    most a 64th of the [n, T, T] map (scores and probabilities together a 32nd), or
    ``_MIN_CHUNK_ELEMENTS``, so short sequences take all heads in one product: all heads at once
    when they fit, else one head and as many query rows as fit."""
    budget = max(_MIN_CHUNK_ELEMENTS, n * t_q * t_k // 64)
    per_head = n * t_q * t_k
    if per_head * heads <= budget:
        return heads, t_q
    if per_head <= budget:
        return budget // per_head, t_q
    return 1, max(1, budget // (n * t_k))


def _batch_rows(tensor: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """The recorded rows of a per-sequence tensor (one broadcast over the batch is kept as is)."""
    if tensor is None or rows is None or tensor.shape[0] == 1:
        return tensor
    return tensor.index_select(0, rows)


def _chunk(mask: Tensor, rows: Tensor | None, h0: int, h1: int, r0: int, r1: int, c1: int) -> Tensor:
    """The recorded batch rows, heads h0:h1, query rows r0:r1 and keys :c1 of a [n or 1, 1 or H, T, T]
    mask or bias: a copy of that chunk only."""
    chunk = mask[:, :, r0:r1, :c1] if mask.shape[1] == 1 else mask[:, h0:h1, r0:r1, :c1]
    return _batch_rows(chunk, rows)


@torch.no_grad()
def capture_attention(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int],
    micro_batch_size: int = 8,
    position_ids: Tensor | None = None,
) -> Tensor:
    """[N, T] ids/mask (prompt left-padded + response right-padded; padding anywhere) -> [N, T, T] float32
    head- and layer-mean attention maps Ā[n, query, key], zeros at padded rows and columns.

    One forward pass per micro-batch, in eval mode (dropout off; the modules' train/eval flags
    are restored after), with ``use_cache=False``. Attention probabilities are computed only for
    ``layers``, and the pass stops right after the last of them: no later layer, final norm or LM
    head runs. ``position_ids`` ([N, T]) are passed through; give
    ``position_ids_from_mask(attention_mask)`` to number positions as generation does with left
    padding (None lets the model count 0..T-1). Works on a plain ``PreTrainedModel`` and a
    ``PeftModel`` (adapter on, or inside ``disable_adapter()``); the maps live on the model's device.

    Memory: the result ``[N, T, T]`` float32 is the only lasting allocation (each micro-batch's
    maps are summed in place into its slice). On top of it and of the truncated forward's own
    activations, only while a recorded layer runs: one chunk of scores and probabilities (together
    at most a 32nd of an ``[m, T, T]`` map, or 2 MiB), the chunk of the mask it reads and float32
    copies of the chunk's query and key (none for float32 models), m = min(N, micro_batch_size).
    ``tests/test_capture.py`` measures it with torch.profiler's CPU memory events (tiny Llama,
    N = m = 2, T = 1024, one map = 8 MiB, where the 1 MiB chunk floor is an eighth of a map): the
    recording code's peak is 1.4 maps including the result, and the whole capture's extra peak over
    the same sdpa forward cut at that layer 0.9 maps; an eager forward with ``output_attentions``
    needs about 20.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: must be at least 1")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both "
            "be [N, T]"
        )
    top = _outermost_pretrained(model)
    device = top.get_input_embeddings().weight.device
    n, t = input_ids.shape
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with AttentionRecorder(model, layers, stop_after_last=True) as recorder:
            out = None
            if n > micro_batch_size:
                out = torch.empty(n, t, t, dtype=torch.float32, device=device)
            for start in range(0, n, micro_batch_size):
                stop = min(start + micro_batch_size, n)
                mask = attention_mask[start:stop].to(device)
                recorder.run(
                    input_ids=input_ids[start:stop].to(device),
                    attention_mask=mask,
                    position_ids=None if position_ids is None else position_ids[start:stop].to(device),
                    use_cache=False,
                    out=None if out is None else out[start:stop],
                )
                maps = recorder.take(attention_mask=mask)
        return maps if out is None else out
    finally:
        for module, training in modes.items():
            module.training = training
