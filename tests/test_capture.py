"""Attention capture: maps equal eager's head/layer means, the model is untouched, the pass stops early,
memory stays small."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from lightning_flow.capture import (
    PROFILER_RANGE,
    AttentionRecorder,
    capture_attention,
    default_capture_layers,
)
from lightning_flow.policy import PolicyConfig, load_policy, position_ids_from_mask

from .lora import perturb_lora


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def implementations(model) -> list:
    """The attention implementation of every config in the model."""
    return [
        m.config._attn_implementation
        for m in base_of(model).modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]


def make_batch(vocab: int, n: int = 4, t: int = 14, padded: bool = True, seed: int = 0):
    """Ids, mask and generation-style positions; rows mix left (prompt) and right (response) padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, t), generator=generator)
    mask = torch.ones(n, t, dtype=torch.long)
    if padded:
        pads = [(3, 0), (0, 4), (2, 2), (0, 0), (5, 1), (1, 6)]
        for row in range(n):
            left, right = pads[row % len(pads)]
            mask[row, :left] = 0
            if right:
                mask[row, t - right :] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, position_ids_from_mask(mask)


@torch.no_grad()
def eager_reference(model, ids, mask, positions, layers) -> torch.Tensor:
    """Mean over `layers` and heads of eager attention (output_attentions), padded rows/cols zeroed."""
    base = base_of(model)
    original = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            output_attentions=True,
            use_cache=False,
        )
    finally:
        base.set_attn_implementation(original)
    maps = torch.stack([out.attentions[layer].float() for layer in layers]).mean(dim=0).mean(dim=1)
    valid = mask.bool()
    return maps * valid[:, :, None] * valid[:, None, :]


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_peft(tiny_policy_dir):
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same model whatever ran before
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4))
    perturb_lora(model, scale=0.3, match="lora_B")
    return model


@pytest.fixture(scope="module")
def tiny_plain(tiny_policy_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def stories_peft(stories260k):
    torch.manual_seed(0)  # as tiny_peft
    model = load_policy(
        PolicyConfig(str(stories260k), lora_rank=4, lora_target_modules=["q_proj", "k_proj", "v_proj"])
    )
    perturb_lora(model, seed=1, scale=0.3, match="lora_B")
    return model


MODELS = ["tiny_peft", "tiny_plain", "stories_peft"]


# ---------------------------------------------------------------------------------------------
# layer choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "num_layers, count, expected",
    [
        (5, 5, [1, 2, 3]),  # floor(5/3)=1 .. floor(10/3)=3: 1, 1.5, 2, 2.5, 3 round half up -> 1, 2, 2, 3, 3
        (28, 5, [9, 11, 14, 16, 18]),  # 9 .. 18: 9, 11.25, 13.5, 15.75, 18
        (36, 5, [12, 15, 18, 21, 24]),  # 12 .. 24, step 3
        (1, 5, [0]),
        (2, 5, [0, 1]),
        (3, 5, [1, 2]),
        (28, 1, [14]),  # the middle of 9 .. 18, half up
        (28, 3, [9, 14, 18]),
        (64, 5, [21, 26, 32, 37, 42]),
    ],
)
def test_default_capture_layers(num_layers, count, expected):
    layers = default_capture_layers(num_layers, count)
    assert layers == expected
    assert all(num_layers // 3 <= layer <= (2 * num_layers) // 3 for layer in layers)


def test_default_capture_layers_rejects_nonsense():
    with pytest.raises(ValueError):
        default_capture_layers(0)
    with pytest.raises(ValueError):
        default_capture_layers(12, count=0)


# ---------------------------------------------------------------------------------------------
# maps equal eager
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("model_name", MODELS)
def test_maps_equal_eager_head_and_layer_mean(request, model_name, padded):
    model = request.getfixturevalue(model_name)
    num_layers = base_of(model).config.num_hidden_layers
    layers = default_capture_layers(num_layers)
    ids, mask, positions = make_batch(base_of(model).config.vocab_size, n=5, padded=padded)
    before = implementations(model)
    maps = capture_attention(model, ids, mask, layers, micro_batch_size=2, position_ids=positions)
    assert implementations(model) == before
    assert maps.dtype == torch.float32 and maps.shape == (5, 14, 14)
    torch.testing.assert_close(maps, eager_reference(model, ids, mask, positions, layers), rtol=0, atol=1e-5)


def test_adapter_matters_and_disable_adapter_is_captured(tiny_peft):
    ids, mask, positions = make_batch(tiny_peft.config.vocab_size)
    layers = [0, 1]
    with_adapter = capture_attention(tiny_peft, ids, mask, layers, position_ids=positions)
    with tiny_peft.disable_adapter():
        without = capture_attention(tiny_peft, ids, mask, layers, position_ids=positions)
        torch.testing.assert_close(
            without, eager_reference(tiny_peft, ids, mask, positions, layers), rtol=0, atol=1e-5
        )
    assert (with_adapter - without).abs().max() > 1e-3


def test_gqa_single_layer_and_micro_batches_agree(stories_peft):
    ids, mask, positions = make_batch(512, n=5)
    whole = capture_attention(stories_peft, ids, mask, [4], micro_batch_size=8, position_ids=positions)
    split = capture_attention(stories_peft, ids, mask, [4], micro_batch_size=2, position_ids=positions)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        whole, eager_reference(stories_peft, ids, mask, positions, [4]), rtol=0, atol=1e-5
    )


def _gemma2_eager():
    """Sliding-window and full layers, logit soft-capping, GQA; Gemma 2 has no sdpa path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config)


def _qwen2_sdpa():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("build", [_gemma2_eager, _qwen2_sdpa], ids=["gemma2-eager", "qwen2-sdpa"])
def test_other_architectures_match_eager(build):
    torch.manual_seed(0)
    model = build().eval()
    original = model.config._attn_implementation
    ids, mask, positions = make_batch(100)
    maps = capture_attention(model, ids, mask, [0, 1, 2], position_ids=positions)
    assert model.config._attn_implementation == original
    torch.testing.assert_close(
        maps, eager_reference(model, ids, mask, positions, [0, 1, 2]), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "min_elements, chunks", [(200, "one head, 2 query rows"), (2000, "2 of 4 heads, all rows")]
)
@pytest.mark.parametrize(
    "build, padded",
    [(_gemma2_eager, True), (_qwen2_sdpa, False), (_qwen2_sdpa, True)],
    ids=["gemma2-eager-padded", "qwen2-sdpa-causal", "qwen2-sdpa-padded"],
)
def test_chunked_recording_matches_eager(build, padded, min_elements, chunks, monkeypatch):
    """n=5, T=14: one head's scores are 980 elements, an eighth of the map 122. A floor of 200
    elements leaves one head and 200 // 70 = 2 query rows per chunk; 2000 takes two heads at once. Masks,
    soft-capping, sliding windows and GQA must be sliced with the chunk."""
    import lightning_flow.capture as capture

    monkeypatch.setattr(capture, "_MIN_CHUNK_ELEMENTS", min_elements)
    assert capture._chunk_shape(5, 4, 14, 14) == ((1, 2) if min_elements == 200 else (2, 14))
    torch.manual_seed(0)
    model = build().eval()
    ids, mask, positions = make_batch(100, n=5, padded=padded)
    maps = capture_attention(model, ids, mask, [0, 1, 2], micro_batch_size=5, position_ids=positions)
    torch.testing.assert_close(
        maps, eager_reference(model, ids, mask, positions, [0, 1, 2]), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "t, min_elements, rows_per_chunk",
    [(14, 200, 2), (256, 2**20, 64)],
    ids=["2-row chunks by memory", "4 chunks of a 256-row causal layer"],
)
def test_causal_chunks_compute_only_the_keys_their_queries_see(monkeypatch, t, min_elements, rows_per_chunk):
    """A causal layer's chunk of query rows ending at row r1 scores keys :r1 only: with chunks of
    2 rows (T = 14, a small memory floor) 2 × (2 + 4 + ... + 14) = 112 of each head's 196 scores;
    a layer of 256 rows or more is split in 4 chunks, 64 × (64 + 128 + 192 + 256) of 256². The maps stay
    exact."""
    import lightning_flow.capture as capture

    monkeypatch.setattr(capture, "_MIN_CHUNK_ELEMENTS", min_elements)
    torch.manual_seed(0)
    model = _qwen2_sdpa().eval()
    n = 5 if t == 14 else 2
    ids, mask, positions = make_batch(100, n=n, t=t, padded=True)
    scored = []
    softmax = torch.softmax
    monkeypatch.setattr(
        torch, "softmax", lambda x, *args, **kwargs: scored.append(x.numel()) or softmax(x, *args, **kwargs)
    )
    maps = capture_attention(model, ids, mask, [0, 1, 2], micro_batch_size=n, position_ids=positions)
    monkeypatch.setattr(torch, "softmax", softmax)
    per_head = rows_per_chunk * sum(range(rows_per_chunk, t + 1, rows_per_chunk))
    assert (
        sum(scored)
        == n * model.config.num_attention_heads * 3 * per_head
        < n * model.config.num_attention_heads * 3 * t * t
    )
    torch.testing.assert_close(
        maps, eager_reference(model, ids, mask, positions, [0, 1, 2]), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("rows", [[1, 3, 4], [2], []], ids=["three", "one", "none"])
@pytest.mark.parametrize(
    "build, padded",
    [(_gemma2_eager, True), (_qwen2_sdpa, False), (_qwen2_sdpa, True)],
    ids=["gemma2-eager-padded", "qwen2-sdpa-causal", "qwen2-sdpa-padded"],
)
def test_recording_selected_rows_gives_their_eager_maps(build, padded, rows, monkeypatch):
    """``run(rows=...)`` records only those batch rows (masks, soft-capping, GQA sliced with them,
    in chunks of one head and 2 query rows), in that order, into ``out`` ([k, T, T])."""
    import lightning_flow.capture as capture

    monkeypatch.setattr(capture, "_MIN_CHUNK_ELEMENTS", 200)
    torch.manual_seed(0)
    model = build().eval()
    ids, mask, positions = make_batch(100, n=5, padded=padded)
    out = torch.full((len(rows), 14, 14), 7.0)  # stale values must not survive
    with AttentionRecorder(model, [0, 1, 2], stop_after_last=True) as recorder:
        recorder.run(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            out=out,
            rows=torch.tensor(rows, dtype=torch.long),
        )
        maps = recorder.take()
    expected = eager_reference(model, ids, mask, positions, [0, 1, 2])[rows]
    assert maps.data_ptr() == out.data_ptr() and maps.shape == (len(rows), 14, 14)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


def test_bfloat16_model_matches_eager_to_bfloat16_precision(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4, dtype="bfloat16"))
    perturb_lora(model, scale=0.3, match="lora_B")
    ids, mask, positions = make_batch(model.config.vocab_size)
    maps = capture_attention(model, ids, mask, [0, 1], position_ids=positions)
    assert maps.dtype == torch.float32
    valid = mask.bool()
    torch.testing.assert_close(maps.sum(-1)[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
    # eager rounds scores and probabilities to bfloat16; the capture keeps them in float32
    torch.testing.assert_close(maps, eager_reference(model, ids, mask, positions, [0, 1]), rtol=0, atol=2e-2)


@pytest.mark.parametrize("model_name", MODELS)
def test_rows_sum_to_one_and_padding_is_exactly_zero(request, model_name):
    model = request.getfixturevalue(model_name)
    ids, mask, positions = make_batch(base_of(model).config.vocab_size, n=6, t=16)
    captured = capture_attention(model, ids, mask, [0, 1], position_ids=positions)
    with torch.no_grad(), AttentionRecorder(model, [0, 1], stop_after_last=True) as recorder:
        recorder.run(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        recorded = recorder.take()  # no mask given: the padding is read from the model's own mask
    valid = mask.bool()
    for maps in (captured, recorded):
        assert not maps.isnan().any()
        torch.testing.assert_close(maps.sum(-1)[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
        assert (maps[~valid] == 0).all()  # padded query rows
        assert (maps.transpose(1, 2)[~valid] == 0).all()  # padded key columns
        assert (maps.triu(1) == 0).all()  # causal


# ---------------------------------------------------------------------------------------------
# the model is untouched
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", MODELS)
def test_full_forward_inside_recorder_equals_plain_forward(request, model_name):
    model = request.getfixturevalue(model_name)
    model.eval()
    ids, mask, positions = make_batch(base_of(model).config.vocab_size)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with AttentionRecorder(model, [0, 1], stop_after_last=False) as rec:
            recorded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            maps = rec.take()
    assert torch.equal(recorded, plain)
    torch.testing.assert_close(
        maps * mask.bool()[:, :, None],
        capture_attention(model, ids, mask, [0, 1], position_ids=positions),
        rtol=0,
        atol=1e-6,
    )


def test_eager_model_is_recorded_through_eager_and_restored(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4, attn_implementation="eager"))
    perturb_lora(model, scale=0.3, match="lora_B")
    model.eval()
    ids, mask, positions = make_batch(model.config.vocab_size)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with AttentionRecorder(model, [1]) as rec:
            recorded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(recorded, plain)
    assert implementations(model) and set(implementations(model)) == {"eager"}
    torch.testing.assert_close(
        rec.take(mask), eager_reference(model, ids, mask, positions, [1]), rtol=0, atol=1e-5
    )


def test_implementation_restored_after_an_exception(tiny_peft):
    before = implementations(tiny_peft)
    assert set(before) == {"sdpa"}
    ids, mask, positions = make_batch(tiny_peft.config.vocab_size)
    with pytest.raises(ZeroDivisionError):
        with AttentionRecorder(tiny_peft, [0]) as rec:
            assert set(implementations(tiny_peft)) != {"sdpa"}  # switched while recording
            tiny_peft(input_ids=ids, attention_mask=mask)
            raise ZeroDivisionError("an error inside the recorder")
    assert implementations(tiny_peft) == before
    with AttentionRecorder(tiny_peft, [0], stop_after_last=True):
        tiny_peft(input_ids=ids, attention_mask=mask)
        raise AssertionError("not reached: the pass stops after layer 0")
    assert implementations(tiny_peft) == before
    # the recorder can be entered again, and a nested recorder on the same model is refused
    with rec:
        with pytest.raises(RuntimeError, match="already recording"):
            AttentionRecorder(tiny_peft, [1]).__enter__()
    assert implementations(tiny_peft) == before


def test_unsupported_model_and_bad_layers_raise(tiny_plain, monkeypatch):
    with pytest.raises(ValueError, match="layers"):
        AttentionRecorder(tiny_plain, [2])
    with pytest.raises(ValueError, match="empty"):
        AttentionRecorder(tiny_plain, [])
    before = implementations(tiny_plain)
    monkeypatch.setattr(type(tiny_plain), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(RuntimeError, match="AttentionInterface"):
        with AttentionRecorder(tiny_plain, [0]):
            pass
    assert implementations(tiny_plain) == before


def test_train_mode_and_checkpointing_are_kept(tiny_policy_dir):
    model = load_policy(PolicyConfig(str(tiny_policy_dir), lora_rank=4, gradient_checkpointing=True))
    perturb_lora(model, scale=0.3, match="lora_B")
    assert model.training
    ids, mask, positions = make_batch(model.config.vocab_size)
    maps = capture_attention(model, ids, mask, [0, 1], position_ids=positions)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(maps, eager_reference(model, ids, mask, positions, [0, 1]), rtol=0, atol=1e-5)
    # inside a training step with checkpointing, the backward's recompute is not recorded a second time
    with AttentionRecorder(model, [0, 1]) as rec:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        recorded = rec.take(mask)
    assert recorded.shape == maps.shape
    torch.testing.assert_close(recorded, maps, rtol=0, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_several_passes_in_one_recorder_are_concatenated(tiny_peft):
    ids, mask, positions = make_batch(tiny_peft.config.vocab_size, n=4)
    with AttentionRecorder(tiny_peft, [0, 1], stop_after_last=True) as rec:
        assert rec.run(input_ids=ids[:2], attention_mask=mask[:2], position_ids=positions[:2]) is None
        assert rec.run(input_ids=ids[2:], attention_mask=mask[2:], position_ids=positions[2:]) is None
        both = rec.take()
        with pytest.raises(RuntimeError, match="no attention was captured"):
            rec.take()
    torch.testing.assert_close(
        both, capture_attention(tiny_peft, ids, mask, [0, 1], position_ids=positions), rtol=0, atol=1e-6
    )


def test_a_recorder_entered_again_starts_afresh(tiny_peft):
    ids, mask, positions = make_batch(tiny_peft.config.vocab_size, n=4)
    rec = AttentionRecorder(tiny_peft, [0, 1], stop_after_last=True)
    with rec:
        rec.run(input_ids=ids[:2], attention_mask=mask[:2], position_ids=positions[:2])  # never taken
    first = rec.stopwatch
    first_seconds = first.seconds()
    with rec:
        rec.run(input_ids=ids[2:], attention_mask=mask[2:], position_ids=positions[2:])
        again = rec.take()  # only this block's map: the first block's untaken one is gone
    assert first_seconds > 0 and rec.stopwatch is not first and rec.stopwatch.seconds() > 0
    assert tiny_peft.config._attn_implementation == "sdpa"
    expected = capture_attention(tiny_peft, ids[2:], mask[2:], [0, 1], position_ids=positions[2:])
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# early stop
# ---------------------------------------------------------------------------------------------
def test_pass_stops_after_the_last_captured_layer(stories_peft):
    base = stories_peft.get_base_model()
    decoder_layers = base.model.layers
    layer_calls = [count_calls(layer) for layer in decoder_layers]
    mlp_calls = [count_calls(layer.mlp) for layer in decoder_layers]
    norm_calls, head_calls = count_calls(base.model.norm), count_calls(base.lm_head)
    ids, mask, positions = make_batch(512, n=5)
    # 3 micro-batches
    capture_attention(stories_peft, ids, mask, [1, 2], micro_batch_size=2, position_ids=positions)
    # layer 2 never finishes (stopped inside its attention)
    assert [c[0] for c in layer_calls] == [
        3,
        3,
        0,
        0,
        0,
    ]
    assert [c[0] for c in mlp_calls] == [3, 3, 0, 0, 0]
    assert norm_calls[0] == 0 and head_calls[0] == 0
    with torch.no_grad(), AttentionRecorder(stories_peft, [1, 2], stop_after_last=False) as rec:
        stories_peft(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert [c[0] for c in layer_calls] == [4, 4, 1, 1, 1] and norm_calls[0] == 1 and head_calls[0] == 1
    assert rec.take().shape == (5, 14, 14)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
RECORD_LABEL = "lightning_flow.capture.record"


def memory_profile(fn):
    """Profile fn with CPU memory events; returns (memory events, windows of the recorder's work),
    time-sorted."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    memory = sorted(
        ((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda e: e[0]
    )
    windows = [(e.start_ns(), e.end_ns()) for e in events if e.name() == RECORD_LABEL]
    return memory, windows


def peak_live(memory) -> int:
    """Peak of the running sum of allocations (+) and frees (−)."""
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


class _Stop(Exception):
    pass


def test_extra_memory_is_about_one_map(tiny_plain, monkeypatch):
    """n=2, T=1024 (one map = 8 MiB, past the 1 MiB chunk floor, so the scores are chunked). Two measures from
    torch.profiler's CPU memory events:
    - what the recording code itself allocates and keeps, at most 1.5 maps: the accumulator (1), one chunk of
      scores and one of probabilities at the 1 MiB floor (an eighth of a map each at this T), the chunk of the
      mask it reads and the float32 query and key of a head (at long T the chunks are a 64th of the map);
    - capture_attention's whole peak minus that of the same sdpa forward cut at the same layer, < 1.5 maps.
    """
    model = tiny_plain.eval()
    ids, mask, positions = make_batch(model.config.vocab_size, n=2, t=1024)
    one_map = 2 * 1024 * 1024 * 4
    layers = [0, 1]
    record = AttentionRecorder._record

    def labelled_record(self, *args, **kwargs):
        with torch.profiler.record_function(RECORD_LABEL):
            return record(self, *args, **kwargs)

    monkeypatch.setattr(AttentionRecorder, "_record", labelled_record)

    def baseline():  # the sdpa forward up to the attention output of the last captured layer
        hook = model.model.layers[layers[-1]].self_attn.o_proj.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(_Stop())
        )
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()

    def capture():
        capture_attention(model, ids, mask, layers, micro_batch_size=2, position_ids=positions)

    capture(), baseline()  # warm up
    memory, windows = memory_profile(capture)
    assert len(windows) == len(layers)
    recording_peak = peak_live([m for m in memory if any(a <= m[0] <= b for a, b in windows)])
    capture_peak = peak_live(memory)
    base_peak = peak_live(memory_profile(baseline)[0])
    eager_peak = peak_live(memory_profile(lambda: eager_reference(model, ids, mask, positions, layers))[0])
    print(
        f"\none map {one_map} B; recording {recording_peak} B ({recording_peak / one_map:.2f} maps); whole "
        "peaks: "
        f"capture {capture_peak}, sdpa cut at the same layer {base_peak}, eager+output_attentions "
        f"{eager_peak}"
    )
    assert one_map <= recording_peak <= 1.5 * one_map  # at least the accumulator is seen
    assert capture_peak - base_peak < 1.5 * one_map
    assert capture_peak < eager_peak


def test_a_profiler_sees_one_recording_range_per_recorded_layer(tiny_peft):
    ids, mask, positions = make_batch(64, n=3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        capture_attention(tiny_peft, ids, mask, [0, 1], micro_batch_size=2, position_ids=positions)
    ranges = [event for event in prof.key_averages() if event.key == PROFILER_RANGE]
    assert sum(event.count for event in ranges) == 2 * 2  # two layers in each of two micro-batches
