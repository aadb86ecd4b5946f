"""Answer-token masks: character offsets of decoded tokens and the tokens of the final answer.

Run on three real tokenizers: GPT-2 byte-level BPE, the stories260K SentencePiece model (byte
fallback, leading-space strip) and the one-character-per-token tokenizer. Test inputs are made
by encoding strings; expected answers are written out by hand or read off the plain strings.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lightning_flow.flow import answer as answer_module
from lightning_flow.flow.answer import (
    SOURCE_BOXED,
    SOURCE_FALLBACK,
    SOURCE_HASH,
    SOURCE_NONE,
    answer_masks,
    answer_token_mask,
    find_answer,
    token_char_offsets,
)
from lightning_flow.loss import completion_mask
from lightning_flow.tiny import build_char_tokenizer
from lightning_flow.tokenizer import load_tokenizer

# (response text, the answer text it ends with or None, expected source)
CASES = [
    ("Let me think. 3+4=7, so the answer is \\boxed{7}.", "7", SOURCE_BOXED),
    ("We get $\\boxed{\\frac{1}{2}}$ as the result.", "\\frac{1}{2}", SOURCE_BOXED),
    ("First \\boxed{3}, then \\boxed{42} at last.\n", "42", SOURCE_BOXED),
    ("Spaces kept:  \\boxed{ 17 } end", " 17 ", SOURCE_BOXED),
    ("She pays 1,000 + 234 dollars.\n#### 1,234", "1,234", SOURCE_HASH),
    ("Total: 5 apples.\n\n####  $56.5\n", "56.5", SOURCE_HASH),
    ("No final answer here, sorry.", None, SOURCE_FALLBACK),
    ("The box is empty: \\boxed{}", None, SOURCE_FALLBACK),
    ("Café prices ≤ 5€ 😀\nso \\boxed{x≤😀5} done", "x≤😀5", SOURCE_BOXED),
    ("∑ over terms → \\boxed{\\frac{π}{2}}", "\\frac{π}{2}", SOURCE_BOXED),
    ("Über naïve 😀😀 résumé\n#### 12", "12", SOURCE_HASH),
    ("日本語のテキスト。答えは \\boxed{四十二}", "四十二", SOURCE_BOXED),
]
TOKENIZERS = ["gpt2", "stories260k", "char"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    if request.param == "gpt2":
        return request.getfixturevalue("gpt2_tokenizer")
    if request.param == "stories260k":
        return load_tokenizer(str(request.getfixturevalue("stories260k")))
    return build_char_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def cases_for(tokenizer) -> list[tuple[str, str | None, int]]:
    # The character tokenizer knows printable ASCII only (anything else becomes <unk>).
    if len(tokenizer) < 200:
        return [case for case in CASES if case[0].isascii()]
    return CASES


def prefix_oracle(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Characters of ``text`` fully produced after each prefix of ``ids`` (quadratic decodes)."""
    done, result = [], 0
    for j in range(len(ids)):
        prefix = tokenizer.decode(ids[: j + 1], skip_special_tokens=True)
        common = 0
        while common < min(len(prefix), len(text)) and prefix[common] == text[common]:
            common += 1
        result = max(result, common)
        done.append((result, len(prefix) > result))  # (complete characters, a character pending)
    return done


def check_offsets(tokenizer, ids: list[int], text: str, offsets: list[tuple[int, int]]) -> None:
    assert len(offsets) == len(ids)
    special = set(tokenizer.all_special_ids)
    covered = 0
    rebuilt = []
    previous_start = previous_end = 0
    for token, (start, end) in zip(ids, offsets):
        assert 0 <= start <= end <= len(text)
        assert start >= previous_start  # starts never go back
        previous_start = start
        if token in special:
            assert start == end
        if start < end:
            assert start >= covered - 1  # neighbours share at most one (split) character
            assert end >= previous_end  # nor do the ends of spans that hold characters
            previous_end = end
        rebuilt.append(text[max(start, covered) : end])
        covered = max(covered, end)
    assert "".join(rebuilt) == text
    if all(len(c.encode()) == 1 for c in text):  # no multi-byte characters: spans tile the text
        assert "".join(text[s:e] for s, e in offsets) == text
    # Against the decodes of every prefix: token j starts where the characters completed by
    # tokens < j end, and ends where its prefix's complete text ends (plus a pending character).
    oracle = prefix_oracle(tokenizer, ids, text)
    previous_done = 0
    for j, (token, (start, end)) in enumerate(zip(ids, offsets)):
        done, pending = oracle[j]
        if token not in special:
            assert start == previous_done, (j, tokenizer.convert_ids_to_tokens([token]))
            assert end == done + int(pending and done < len(text)), (
                j,
                tokenizer.convert_ids_to_tokens([token]),
            )
        previous_done = done


def answer_location(text: str, answer: str) -> tuple[int, int]:
    """Where the final answer sits in a plain string: its last occurrence."""
    start = text.rfind(answer)
    assert start >= 0, (text, answer)
    return start, start + len(answer)


# ---- offsets ----------------------------------------------------------------------------------
def test_offsets_match_decode_on_every_case(tokenizer):
    for text, _, _ in cases_for(tokenizer):
        ids = encode(tokenizer, text)
        decoded, offsets = token_char_offsets(tokenizer, ids)
        assert decoded == tokenizer.decode(ids, skip_special_tokens=True)
        check_offsets(tokenizer, ids, decoded, offsets)
        # Special tokens mid-response (EOS, BOS) add no characters and are skipped.
        mixed = (
            ids[:3] + [tokenizer.eos_token_id] + ids[3:] + [tokenizer.bos_token_id or tokenizer.eos_token_id]
        )
        decoded, offsets = token_char_offsets(tokenizer, torch.tensor(mixed))
        assert decoded == tokenizer.decode(mixed, skip_special_tokens=True)
        check_offsets(tokenizer, mixed, decoded, offsets)


def test_fast_path_needs_no_fallback(tokenizer, monkeypatch):
    """The real tokenizers are handled by DecodeStream alone, never by the slow paths."""

    def fail(*_args, **_kwargs):
        raise AssertionError("fell back to the incremental decoder")

    monkeypatch.setattr(answer_module, "_incremental_pieces", fail)
    for text, _, _ in cases_for(tokenizer):
        ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
        token_char_offsets(tokenizer, ids)


def test_fallback_paths_agree_with_fast_path(tokenizer, monkeypatch):
    texts = [case[0] for case in cases_for(tokenizer)]
    expected = [token_char_offsets(tokenizer, encode(tokenizer, t)) for t in texts]

    # A duck-typed tokenizer without a tokenizers backend: the pure-decode incremental path.
    class PlainTokenizer:
        all_special_ids = tokenizer.all_special_ids

        def decode(self, ids, skip_special_tokens=False):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    plain = PlainTokenizer()
    assert [token_char_offsets(plain, encode(tokenizer, t)) for t in texts] == expected
    # Both incremental paths unusable: the quadratic prefix-decode path.
    monkeypatch.setattr(
        answer_module, "_incremental_pieces", lambda decode, ids: [""] * (len(ids) - 1) + ["\x00"]
    )
    assert [token_char_offsets(plain, encode(tokenizer, t)) for t in texts] == expected


def test_split_characters_belong_to_every_token_holding_their_bytes(gpt2_tokenizer):
    tok = gpt2_tokenizer
    pieces = ["ðŁ", "ĺ", "Ģ"]  # the four UTF-8 bytes of 😀 as three byte-level tokens
    emoji = [tok.convert_tokens_to_ids(p) for p in pieces]
    ids = encode(tok, "so \\boxed{") + emoji + encode(tok, "5}") + [tok.eos_token_id]
    text, offsets = token_char_offsets(tok, ids)
    assert text == "so \\boxed{😀5}"
    first = len(ids) - len(emoji) - 3
    assert [text[s:e] for s, e in offsets[first : first + 3]] == ["😀"] * 3
    marks = answer_token_mask(offsets, find_answer(text)[0])
    assert [i for i, m in enumerate(marks) if m] == [first, first + 1, first + 2, first + 3]
    # A response cut inside a character: the dangling bytes decode to U+FFFD at the end.
    cut = encode(tok, "x = ") + emoji[:2]
    text, offsets = token_char_offsets(tok, cut)
    assert text == tok.decode(cut) and text.endswith("\ufffd")
    check_offsets(tok, cut, text, offsets)


def test_runs_of_several_tokens_take_the_exact_path(gpt2_tokenizer, stories260k, monkeypatch):
    """Rows where some non-special token completes no text by itself skip the running-sum spans:
    their runs are resolved by decoding, and agree with the quadratic prefix path."""
    resolved_runs = []
    place_run = answer_module._place_run

    def counting_place_run(*args):
        resolved_runs.append(args[4:6])  # (start, stop)
        return place_run(*args)

    monkeypatch.setattr(answer_module, "_place_run", counting_place_run)
    gpt2 = gpt2_tokenizer
    emoji = [gpt2.convert_tokens_to_ids(p) for p in ["ðŁ", "ĺ", "Ģ"]]  # the bytes of 😀, split
    stories = load_tokenizer(str(stories260k))
    first = stories.convert_tokens_to_ids(["▁", "F", "ir", "st"])
    rows = [
        # (tokenizer, ids, the text each token spans, written out by hand, the runs resolved)
        (
            gpt2,
            encode(gpt2, "so") + emoji + encode(gpt2, "5") + [gpt2.eos_token_id],
            ["so", "😀", "😀", "😀", "5", ""],
            [(1, 4)],
        ),
        # SentencePiece strips the space of a leading "▁": it completes no text until "F" does.
        (stories, first + [stories.eos_token_id], ["", "F", "ir", "st", ""], [(0, 2)]),
        # The same "▁" inside the text is a space of its own; no run to resolve.
        (
            stories,
            stories.convert_tokens_to_ids(["▁O", "k", "."]) + first,
            ["O", "k", ".", " ", "F", "ir", "st"],
            [],
        ),
    ]
    for tok, ids, spelled, runs in rows:
        resolved_runs.clear()
        text, offsets = token_char_offsets(tok, ids)
        assert [text[s:e] for s, e in offsets] == spelled
        assert resolved_runs == runs
        decode = answer_module._decoder(tok)
        assert offsets == answer_module._resolve_run(decode, [], ids, text, frozenset(tok.all_special_ids))


def test_special_tokens_inside_a_response_get_empty_spans():
    tok = build_char_tokenizer()
    ids = encode(tok, "ab") + [tok.eos_token_id] + encode(tok, "c") + [tok.bos_token_id, tok.pad_token_id]
    assert token_char_offsets(tok, ids) == ("abc", [(0, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 3)])


def test_pieces_that_disagree_with_the_text_are_rejected():
    ids = [5, 6, 7]

    def decode(ids):  # never called: nothing to resolve
        return "?"

    assert answer_module._assemble(decode, ids, ["a", "b", "c"], "abc", frozenset()) == [
        (0, 1),
        (1, 2),
        (2, 3),
    ]
    assert answer_module._assemble(decode, ids, ["a", "b", "c"], "abd", frozenset()) is None
    assert answer_module._assemble(decode, ids, ["a", "b", "c"], "abcd", frozenset()) is None


def test_spans_from_the_piece_table_only_where_the_pieces_spell_the_text():
    table = ["a", "", "bc", "d"]  # id 1 decodes to nothing alone (a special token)
    assert answer_module._spans_from_table(table, [0, 1, 2], "abc") == [(0, 1), (1, 1), (1, 3)]
    # a space the decoder put between them
    assert answer_module._spans_from_table(table, [0, 2], "a bc") is None
    assert answer_module._spans_from_table(table, [0, 4], "a?") is None  # an id past the table


def test_piece_table_gives_the_masks_of_the_incremental_decode(tokenizer, monkeypatch, request):
    """With the table, rows whose tokens' own texts spell the response skip the incremental decode;
    the others (split characters, SentencePiece spaces) take it; the masks are the same either way."""
    table = answer_module.piece_table(tokenizer)
    assert len(table) == len(tokenizer)
    rng = random.Random(1)
    rows = [encode(tokenizer, text) + [tokenizer.eos_token_id] for text, _, _ in CASES]
    rows += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in rows])
    expected = answer_masks(tokenizer, ids, mask)
    decoded = []
    real = answer_module._stream_pieces
    monkeypatch.setattr(
        answer_module,
        "_stream_pieces",
        lambda backend, row_ids: decoded.append(row_ids) or real(backend, row_ids),
    )
    got = answer_masks(tokenizer, ids, mask, pieces=table)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ascii_rows = [row for row, (text, _, _) in zip(rows, CASES) if text.isascii()]
    if request.node.callspec.params["tokenizer"] == "stories260k":
        # a "▁" inside the text decodes alone without its space
        assert any(row in decoded for row in ascii_rows)
    else:  # byte-level BPE and one-character vocabularies: ASCII rows come from the table
        assert not any(row in decoded for row in ascii_rows)


def test_random_token_sequences_keep_offsets_consistent(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(12):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        text, offsets = token_char_offsets(tokenizer, ids)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        covered, rebuilt = 0, []
        for start, end in offsets:
            rebuilt.append(text[max(start, covered) : end])
            covered = max(covered, end)
        assert "".join(rebuilt) == text
        assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)


def test_empty_response():
    tok = build_char_tokenizer()
    assert token_char_offsets(tok, []) == ("", [])
    assert answer_token_mask([], None) == []
    assert token_char_offsets(tok, [tok.eos_token_id]) == ("", [(0, 0)])


# ---- answer tokens ----------------------------------------------------------------------------
def test_answer_tokens_spell_the_answer_minimally(tokenizer):
    for text, expected, expected_source in cases_for(tokenizer):
        ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
        decoded, offsets = token_char_offsets(tokenizer, ids)
        span, source = find_answer(decoded)
        marks = answer_token_mask(offsets, span)
        marked = [j for j, m in enumerate(marks) if m]
        batch_marks, batch_source = answer_masks(tokenizer, torch.tensor([ids]), torch.ones(1, len(ids)))
        assert batch_marks[0].tolist() == marks
        assert int(batch_source[0]) == expected_source
        assert not marks[-1]  # the EOS
        if expected is None:
            assert span is None and source == SOURCE_NONE
            last_text_token = max(j for j, (s, e) in enumerate(offsets) if s < e)
            assert marked == [last_text_token]
            assert answer_token_mask(offsets, span, fallback="none") == [False] * len(ids)
            continue
        assert source == expected_source
        first, last = answer_location(decoded, expected)
        assert span == (first, last)
        assert marked == list(range(marked[0], marked[-1] + 1))  # one contiguous run
        spelled = tokenizer.decode([ids[j] for j in marked])
        # SentencePiece decoders drop the leading space of a sequence's first token.
        assert expected in spelled or (
            expected[0] == " " and not spelled.startswith(" ") and expected[1:] in spelled
        )
        for j in (marked[0], marked[-1]):  # minimal: the ends of the run touch the answer
            start, end = offsets[j]
            assert start < last and end > first, (text, j)


def test_answer_mask_rules():
    offsets = [(0, 2), (2, 4), (4, 4), (4, 7), (7, 7)]
    assert answer_token_mask(offsets, (3, 5)) == [False, True, False, True, False]
    assert answer_token_mask(offsets, (2, 4)) == [False, True, False, False, False]
    assert answer_token_mask(offsets, None) == [False, False, False, True, False]
    assert answer_token_mask(offsets, None, exclude=[False, False, False, True, False]) == [
        False,
        True,
        False,
        False,
        False,
    ]
    assert answer_token_mask(offsets, (4, 4)) == [False, False, False, True, False]  # empty: fallback
    assert answer_token_mask(offsets, None, fallback="none") == [False] * 5
    # A long token reaching into the answer, a character split over two tokens, a special token.
    offsets = [(0, 3), (3, 6), (5, 7), (7, 7), (7, 9), (9, 9)]
    assert answer_token_mask(offsets, (1, 2)) == [True, False, False, False, False, False]
    assert answer_token_mask(offsets, (4, 5)) == [False, True, False, False, False, False]
    assert answer_token_mask(offsets, (5, 6)) == [False, True, True, False, False, False]
    assert answer_token_mask(offsets, (6, 8)) == [False, False, True, False, True, False]
    excluded = [False, False, False, False, True, False]
    assert answer_token_mask(offsets, (0, 9), exclude=excluded) == [True, True, True, False, False, False]
    # fallback
    assert answer_token_mask(offsets, (8, 9), exclude=excluded) == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert answer_token_mask([(0, 2), (2, 2), (2, 2), (2, 4)], (1, 3)) == [True, False, False, True]
    # A special token between two tokens holding bytes of the answer's first character; tokens
    # without characters are passed over on either side of the answer's start.
    assert answer_token_mask([(0, 5), (4, 4), (4, 6), (6, 8)], (4, 8)) == [True, False, True, True]
    assert answer_token_mask([(0, 5), (2, 2), (5, 6)], (3, 5)) == [True, False, False]
    with pytest.raises(ValueError, match="fallback"):
        answer_token_mask(offsets, None, fallback="first")


def test_padded_batch_matches_rows_alone(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = [case[0] for case in cases_for(tokenizer)]
    responses = [encode(tokenizer, t) + [eos] for t in texts]
    responses.append([eos])  # empty response
    responses.append(encode(tokenizer, texts[0]))  # truncated: no EOS
    responses.append(encode(tokenizer, texts[4]) + [eos] + encode(tokenizer, " \\boxed{9}"))  # text after EOS
    width = max(map(len, responses)) + 3
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in responses])
    mask, _ = completion_mask(ids, eos)
    marks, source = answer_masks(tokenizer, ids, mask)
    assert marks.shape == ids.shape and marks.dtype == torch.bool
    assert source.shape == (len(responses),) and source.dtype == torch.long
    assert not (marks & (ids == eos)).any()
    assert not (marks & (mask == 0)).any()
    for i, response in enumerate(responses):
        row = torch.tensor([response])
        alone, alone_source = answer_masks(tokenizer, row, completion_mask(row, eos)[0])
        assert marks[i, : len(response)].tolist() == alone[0].tolist()
        assert int(source[i]) == int(alone_source[0])
    assert not marks[len(texts)].any() and int(source[len(texts)]) == SOURCE_NONE
    assert int(source[-1]) == SOURCE_HASH  # the box after the EOS is not part of the response
    none_marks, none_source = answer_masks(tokenizer, ids, mask, fallback="none")
    assert (none_source[source == SOURCE_FALLBACK] == SOURCE_NONE).all()
    assert not none_marks[source == SOURCE_FALLBACK].any()
    assert torch.equal(none_marks[source != SOURCE_FALLBACK], marks[source != SOURCE_FALLBACK])


def test_all_zero_mask_row_marks_nothing():
    tok = build_char_tokenizer()
    ids = torch.tensor([encode(tok, "\\boxed{1}"), encode(tok, "#### 22  ")])
    mask = torch.ones_like(ids)
    mask[0] = 0
    marks, source = answer_masks(tok, ids, mask)
    assert source.tolist() == [SOURCE_NONE, SOURCE_HASH]
    assert marks[0].tolist() == [False] * 9
    assert marks[1].tolist() == [False] * 5 + [True, True, False, False]
    with pytest.raises(ValueError, match="shape"):
        answer_masks(tok, ids, mask[:, :3])


def test_masked_out_tokens_inside_a_row_are_skipped():
    tok = build_char_tokenizer()
    ids = torch.tensor([encode(tok, "ab\\boxed{12}")] * 3)  # "1" and "2" sit in columns 9 and 10
    mask = torch.ones_like(ids)
    mask[1, 0] = 0  # kept text "b\boxed{12}"
    mask[2, 9] = 0  # kept text "ab\boxed{2}"
    marks, source = answer_masks(tok, ids, mask)
    assert source.tolist() == [SOURCE_BOXED] * 3
    assert [row.nonzero().flatten().tolist() for row in marks] == [[9, 10], [9, 10], [10]]


@pytest.mark.parametrize("which", ["gpt2", "stories260k"])
def test_gsm8k_solutions(which, shared_data, request):
    tok = (
        request.getfixturevalue("gpt2_tokenizer")
        if which == "gpt2"
        else load_tokenizer(str(request.getfixturevalue("stories260k")))
    )
    path = shared_data / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with path.open() as lines:
        solutions = [json.loads(line)["answer"] for _, line in zip(range(50), lines)]
    golds = [re.search(r"####\s*(\S+)\s*$", s).group(1) for s in solutions]
    eos = tok.eos_token_id
    responses = [encode(tok, s) + [eos] for s in solutions]
    width = max(map(len, responses))
    ids = torch.tensor([r + [eos] * (width - len(r)) for r in responses])
    mask, _ = completion_mask(ids, eos)
    marks, source = answer_masks(tok, ids, mask)
    assert source.tolist() == [SOURCE_HASH] * len(solutions)
    for i, gold in enumerate(golds):
        marked = ids[i][marks[i]].tolist()
        spelled = tok.decode(marked)
        assert gold in spelled, (gold, spelled)
        assert len(spelled.strip()) <= len(gold) + 1  # nothing but the number (and a space)
    # The texts the rollouts already hold (decode up to the EOS) give the same masks without a decode.
    texts = [tok.decode(row[: int(n)].tolist(), skip_special_tokens=True) for row, n in zip(ids, mask.sum(1))]
    with_texts = answer_masks(tok, ids, mask, texts=texts)
    assert torch.equal(with_texts[0], marks) and torch.equal(with_texts[1], source)
