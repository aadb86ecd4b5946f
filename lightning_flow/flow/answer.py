"""Answer-token masks: which response tokens spell the final answer.

The answer region S of a response (docs/method.md, "Inputs") is the set of tokens that
produce the characters of the final answer: the content of the last balanced ``\\boxed{...}``,
else the number after the last ``####`` (both as ``rewards.extract_answer`` finds them), else,
optionally, the last response token that produces characters. The tokens are found from
character offsets of the decoded response; the response is never re-tokenised.

Character offsets (``token_char_offsets``)
------------------------------------------
``text`` is ``tokenizer.decode(ids, skip_special_tokens=True)``, the same string the rewards
score. ``offsets[j] = (start, end)`` is the span of ``text`` that token ``j`` produces:

* special tokens, and tokens that add no characters (e.g. a leading SentencePiece ``"▁"`` that
  the decoder strips), get an empty span ``(p, p)`` at the current position;
* a multi-byte UTF-8 character whose bytes are split over several tokens (byte-level BPE
  pieces such as ``"ðŁĺ"`` + ``"Ģ"``, or SentencePiece byte fallback ``<0xF0>`` ... ``<0x80>``)
  belongs to **every** token that holds some of its bytes. Such tokens' spans overlap by that
  one character; all other spans are disjoint. So starts never decrease, nor do the ends of
  non-empty spans, and walking the spans in order while skipping what was already covered
  (``text[max(start, covered):end]``) rebuilds ``text`` exactly; without split characters the
  spans simply tile ``text``. This way every token that carries a byte of an answer character
  is an answer token.

Method: with a table of every id's text decoded alone (``piece_table``; byte-level BPE and
one-character vocabularies), a response whose tokens' texts concatenate to its decoded text
takes those texts as its spans, one lookup per token. Otherwise the ids go through
``tokenizers``' ``DecodeStream`` (one Rust call per token, the
decoder's own incremental mode), which yields the new characters each token completes, or
nothing while a character is still incomplete. When every token either completes text alone or
is a special token (the common case) the spans are the running sums of the pieces' lengths. A
token that completes text alone takes that text; a run of tokens that completes it together
(split characters, a SentencePiece space stripped at the start; rare) is resolved by
decoding the run's prefixes after a few tokens of context and matching them against the run's
text, which also handles invalid byte sequences (shown as U+FFFD). The result is checked piece
by piece against the full decode. When no ``tokenizers`` backend is available, or the check
fails, the same thing runs on a pure ``tokenizer.decode`` incremental decoder (two short decodes
per token), and as a last resort on the decodes of every prefix (quadratic, exact by
construction). Nothing here imports transformers: the tokenizer is used through ``decode``,
``all_special_ids`` and, when present, ``backend_tokenizer``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate, compress
from operator import itemgetter, not_
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_flow.rewards import extract_answer

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None

Span = tuple[int, int]
Decode = Callable[[list[int]], str]

SOURCE_BOXED = 0
"""The answer is the content of the last ``\\boxed{...}``."""
SOURCE_HASH = 1
"""The answer is the number after the last ``####``."""
SOURCE_FALLBACK = 2
"""No answer found: the fallback token (last token producing characters) is marked."""
SOURCE_NONE = 3
"""Nothing is marked (no answer and fallback 'none', or an empty response)."""

_BOXED = "\\boxed{"
_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4  # tokens of context decoded before a run of split-character tokens
_span_start = itemgetter(0)


# ---- character offsets ------------------------------------------------------------------------
def token_char_offsets(
    tokenizer: Any,
    token_ids: Sequence[int] | Tensor,
    special_ids: frozenset[int] | None = None,
    text: str | None = None,
) -> tuple[str, list[Span]]:
    """Decode one response and give each token its character span in the decoded text.

    tokenizer  # anything with decode(ids, skip_special_tokens=True); a transformers fast
               # tokenizer or a tokenizers.Tokenizer takes the fast path
    token_ids  # [L] response ids (special tokens allowed anywhere)
    special_ids  # the tokenizer's special ids (default: read from it; pass them when decoding many responses)
    text       # decode(ids, skip_special_tokens=True) when the caller already has it (saves a decode)
    Returns (text, offsets): text = tokenizer.decode(ids, skip_special_tokens=True) and
    offsets[j] = (start, end), the span of text produced by token j. Special tokens and tokens
    adding no characters get (p, p); a character split over several tokens belongs to each of
    them (see the module docstring).
    """
    ids = [int(i) for i in (token_ids.tolist() if isinstance(token_ids, Tensor) else token_ids)]
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return text, _offsets(
        tokenizer, ids, text, special_token_ids(tokenizer) if special_ids is None else special_ids
    )


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ()))


def _offsets(
    tokenizer: Any, ids: list[int], text: str, special: frozenset[int], pieces: Sequence[str] | None = None
) -> list[Span]:
    if not ids:
        return []
    if pieces is not None:
        spans = _spans_from_table(pieces, ids, text)
        if spans is not None:
            return spans
    backend = _backend(tokenizer)
    if backend is not None and DecodeStream is not None:
        pieces = _stream_pieces(backend, ids)
        if pieces is not None:
            spans = _assemble(_decoder(backend), ids, pieces, text, special)
            if spans is not None:
                return spans
    decode = _decoder(tokenizer)
    spans = _assemble(decode, ids, _incremental_pieces(decode, ids), text, special)
    if spans is not None:
        return spans
    # Last resort, for decoders whose output for a token depends on far-away tokens: every
    # prefix decoded and matched against the full text (quadratic, but always consistent).
    spans = _resolve_run(decode, [], ids, text, special)
    if spans is None:  # pragma: no cover - decode(ids) differs between two identical calls
        raise RuntimeError("tokenizer.decode is not deterministic; cannot map tokens to characters")
    return spans


def piece_table(tokenizer: Any) -> list[str] | None:
    """Every id's text decoded on its own (``decode([id], skip_special_tokens=True)``), for
    ``answer_masks(pieces=...)``; None without a ``tokenizers`` backend. One batch decode of the
    whole vocabulary, so build it once per tokenizer."""
    backend = _backend(tokenizer)
    if backend is None:
        return None
    return backend.decode_batch(
        [[i] for i in range(backend.get_vocab_size(with_added_tokens=True))], skip_special_tokens=True
    )


def _spans_from_table(pieces: Sequence[str], ids: list[int], text: str) -> list[Span] | None:
    """Spans from each token's text decoded alone, when those texts concatenate to ``text`` exactly
    (no character split over tokens, no space that a decoder strips or adds between tokens); None
    otherwise, or for an id outside the table. Then each token produces its own text, which is
    also what the incremental decode would attribute to it."""
    if max(ids) >= len(pieces):
        return None
    texts = [pieces[i] for i in ids]
    return _running_spans(texts) if "".join(texts) == text else None


def _running_spans(pieces: Sequence[str]) -> list[Span]:
    """Spans of pieces laid end to end: piece j covers [sum of the lengths before it, + its own)."""
    ends = list(accumulate(map(len, pieces)))
    return list(zip([0, *ends], ends))


def _backend(tokenizer: Any) -> Any | None:
    """The tokenizers.Tokenizer behind a transformers fast tokenizer, or the object itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "decode_batch") and hasattr(tokenizer, "token_to_id"):
        backend = tokenizer
    return backend


def _decoder(tokenizer: Any) -> Decode:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


def _stream_pieces(backend: Any, ids: list[int]) -> list[str] | None:
    """Per token: the text it completes (DecodeStream.step), or ""; None on any error."""
    try:
        stream = DecodeStream(skip_special_tokens=True)
        step = stream.step
        return [step(backend, token) or "" for token in ids]
    except Exception:
        return None


def _incremental_pieces(decode: Decode, ids: list[int]) -> list[str]:
    """DecodeStream's contract with plain decode calls over a short sliding window.

    The window starts one completed run back, so decoders that treat the first token of a
    sequence specially (SentencePiece's leading-space strip) see the same thing on both sides
    of the difference. A token whose window decode ends in U+FFFD is incomplete ("").
    """
    pieces: list[str] = []
    window_start, read = 0, 0
    seen = ""
    for j in range(len(ids)):
        new = decode(ids[window_start : j + 1])
        if len(new) > len(seen) and new.startswith(seen) and not new.endswith(_REPLACEMENT):
            pieces.append(new[len(seen) :])
            window_start, read = read, j + 1
            seen = decode(ids[window_start:read])
        else:
            pieces.append("")
    return pieces


def _assemble(
    decode: Decode, ids: list[int], pieces: list[str], text: str, special: frozenset[int]
) -> list[Span] | None:
    """Spans from per-token completed text ("" for none); None when the pieces disagree with ``text``.

    A run is the tokens since the last completing token, up to and including the next one
    (usually just that token). A run whose only character-producing token is the completing one
    takes its text directly; longer runs go through ``_resolve_run``. Tokens after the last
    completing token (an incomplete character at the very end) are resolved against the rest.
    """
    joined = "".join(pieces)
    if not text.startswith(joined):
        return None
    if len(joined) == len(text) and special.issuperset(compress(ids, map(not_, pieces))):
        # Each token completes its own text or is a special token (no text): no run to resolve.
        return _running_spans(pieces)
    spans: list[Span] = [(0, 0)] * len(ids)
    pos = start = 0
    for j, piece in enumerate(pieces):
        if not piece:
            continue
        if start == j:  # the common case: one token, its own text
            spans[j] = (pos, pos + len(piece))
        elif all(ids[k] in special for k in range(start, j)):
            for k in range(start, j):
                spans[k] = (pos, pos)
            spans[j] = (pos, pos + len(piece))
        elif not _place_run(decode, ids, pieces, spans, start, j + 1, pos, piece, special):
            return None
        pos += len(piece)
        start = j + 1
    if start < len(ids):
        rest = text[pos:]
        if not rest:
            for k in range(start, len(ids)):
                spans[k] = (pos, pos)
        elif not _place_run(decode, ids, pieces, spans, start, len(ids), pos, rest, special):
            return None
    elif len(joined) != len(text):
        return None
    return spans


def _place_run(
    decode: Decode,
    ids: list[int],
    pieces: list[str],
    spans: list[Span],
    start: int,
    stop: int,
    pos: int,
    target: str,
    special: frozenset[int],
) -> bool:
    """Resolve the run ``ids[start:stop]``, which produces ``target`` at ``pos``, into ``spans``."""
    # Context: whole runs, at least _CONTEXT_TOKENS tokens back (or from the response start),
    # so that start-of-sequence rules (SentencePiece's leading-space strip) act as in the full
    # decode. A context that fuses with the run (byte-fallback bytes decoded as one group) fails
    # the prefix check; then the run is decoded on its own.
    context_start = max(0, start - _CONTEXT_TOKENS)
    while context_start > 0 and not pieces[context_start - 1]:
        context_start -= 1
    local = _resolve_run(decode, ids[context_start:start], ids[start:stop], target, special)
    if local is None and start > 0:
        local = _resolve_run(decode, [], ids[start:stop], target, special)
    if local is None:
        return False
    for k, (a, b) in enumerate(local, start=start):
        spans[k] = (pos + a, pos + b)
    return True


def _resolve_run(
    decode: Decode, context: list[int], run: list[int], target: str, special: frozenset[int]
) -> list[Span] | None:
    """Spans within ``target`` (the text the run produces) of each run token.

    After each token the decoded prefix is ``target[:done]`` plus, while a character is
    incomplete, replacement characters. A token covers from the first character its bytes
    touch (``done`` before it) to ``done`` after it, plus the incomplete character if any.
    """
    prefix = decode(context) if context else ""
    spans: list[Span] = []
    done = 0
    partial = ""
    for k in range(len(run)):
        if run[k] in special:
            spans.append((done, done))
            continue
        full = decode(context + run[: k + 1])
        if not full.startswith(prefix):
            return None
        partial = full[len(prefix) :]
        reached = max(done, _common_prefix_length(partial, target))
        incomplete = len(partial) > reached and reached < len(target)
        spans.append((done, reached + int(incomplete)))
        done = reached
    return spans if partial == target else None


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# ---- the answer span and its tokens -----------------------------------------------------------
def find_answer(text: str) -> tuple[Span | None, int]:
    """(character span of the final answer, source) for a decoded response.

    The span is ``rewards.extract_answer``'s; source is SOURCE_BOXED or SOURCE_HASH, or
    (None, SOURCE_NONE) when there is no answer or it is empty (``\\boxed{}``).
    """
    span = extract_answer(text)
    if span is None or span[0] >= span[1]:
        return None, SOURCE_NONE
    # A box span starts right after "\boxed{"; a "####" number follows "#", "$" or whitespace.
    return span, SOURCE_BOXED if text.endswith(_BOXED, 0, span[0]) else SOURCE_HASH


def answer_token_mask(
    offsets: Sequence[Span],
    span: Span | None,
    fallback: Literal["last_token", "none"] = "last_token",
    exclude: Sequence[bool] | None = None,
) -> list[bool]:
    """Per token: does it produce a character of the answer span ``[start, end)``?

    offsets   # [L] (start, end) per token, as token_char_offsets gives them (starts, and the
              # ends of non-empty spans, never decrease)
    span      # the answer's character span, or None
    fallback  # with no span (or an empty one): "last_token" marks the last token that produces
              # characters (the last non-EOS, non-special token), "none" marks nothing
    exclude   # [L] optional, True for tokens that are never marked (e.g. EOS)
    """
    if exclude is not None and len(exclude) != len(offsets):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(offsets)} tokens")
    marked, _ = _mark(offsets, span, fallback, (lambda j: False) if exclude is None else exclude.__getitem__)
    marks = [False] * len(offsets)
    for j in marked:
        marks[j] = True
    return marks


def _mark(
    offsets: Sequence[Span], span: Span | None, fallback: str, excluded: Callable[[int], bool]
) -> tuple[list[int], bool]:
    """(indices of the marked tokens, whether the span marked them); the fallback applies when it did not.

    Only the tokens near the span are read. Starts never decrease, so the tokens starting in
    ``[first, last)`` are one bisected range, and all of them that produce characters touch the
    answer. Before it, a token touches the answer only if it ends after ``first``; as the ends of
    non-empty spans never decrease, the backward scan stops at the first one that does not.
    """
    if fallback not in ("last_token", "none"):
        raise ValueError(f"fallback must be 'last_token' or 'none', got {fallback!r}")
    if span is not None and span[0] < span[1]:
        first, last = span
        begin = bisect_left(offsets, first, key=_span_start)
        stop = bisect_left(offsets, last, lo=begin, key=_span_start)
        marked = [j for j in range(begin, stop) if offsets[j][0] < offsets[j][1] and not excluded(j)]
        for j in range(begin - 1, -1, -1):
            start, end = offsets[j]
            if start == end:
                continue
            if end <= first:
                break
            if not excluded(j):
                marked.insert(0, j)
        if marked:
            return marked, True
    if fallback == "last_token":
        for j in range(len(offsets) - 1, -1, -1):
            start, end = offsets[j]
            if start < end and not excluded(j):
                return [j], False
    return [], False


def answer_masks(
    tokenizer: Any,
    completion_ids: Tensor,
    completion_mask: Tensor,
    fallback: Literal["last_token", "none"] = "last_token",
    eos_token_ids: int | Sequence[int] | None = None,
    texts: Sequence[str] | None = None,
    pieces: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Answer-token masks for a batch of responses.

    completion_ids   # [N, L] generated ids, padding after the end
    completion_mask  # [N, L] 1 for the response's tokens (up to and including the first EOS,
                     # as loss.completion_mask gives it); only these positions are considered
    fallback         # see answer_token_mask
    eos_token_ids    # ids never marked; default tokenizer.eos_token_id
    texts            # [N] each row's decode(kept ids, skip_special_tokens=True) when the caller
                     # already has it (the rollouts' completions): saves a decode per row
    pieces           # optional ``piece_table(tokenizer)``: rows whose tokens' own texts concatenate
                     # to the row's text take their spans from it (a lookup per token instead of
                     # an incremental decode; the others, e.g. SentencePiece's stripped spaces, do not)
    Returns (answer [N, L] bool, source [N] long): SOURCE_BOXED (0), SOURCE_HASH (1),
    SOURCE_FALLBACK (2) or SOURCE_NONE (3). Each row's text is decode(response ids,
    skip_special_tokens=True), the string the rewards score.
    """
    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            "expected completion_ids and completion_mask of one shape [N, L], got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    if eos_token_ids is None:
        eos_token_ids = getattr(tokenizer, "eos_token_id", None)
    eos = (
        frozenset()
        if eos_token_ids is None
        else frozenset([int(eos_token_ids)] if isinstance(eos_token_ids, int) else map(int, eos_token_ids))
    )
    keep = completion_mask != 0  # [N, L]
    lengths = keep.sum(dim=1).tolist()
    prefix_lengths = keep.int().cumprod(dim=1).sum(dim=1).tolist()  # kept tokens before the first dropped one
    width = completion_ids.shape[1]
    special = special_token_ids(tokenizer)
    source = [SOURCE_NONE] * len(lengths)
    marked: list[int] = []  # flat indices into [N, L]
    for i, (row, length, prefix_length) in enumerate(zip(completion_ids.tolist(), lengths, prefix_lengths)):
        # Usually the padding follows the response: then its token j sits in column j.
        positions = None if prefix_length == length else keep[i].nonzero().squeeze(1).tolist()
        ids = row[:length] if positions is None else [row[j] for j in positions]
        text = tokenizer.decode(ids, skip_special_tokens=True) if texts is None else texts[i]
        span, found = find_answer(text)
        tokens, from_span = _mark(
            _offsets(tokenizer, ids, text, special, pieces), span, fallback, lambda j, ids=ids: ids[j] in eos
        )
        source[i] = found if from_span else (SOURCE_FALLBACK if tokens else SOURCE_NONE)
        marked += [i * width + (j if positions is None else positions[j]) for j in tokens]
    answer = torch.zeros(completion_ids.numel(), dtype=torch.bool)
    answer[torch.tensor(marked, dtype=torch.long)] = True
    return answer.view(completion_ids.shape).to(completion_ids.device), torch.tensor(
        source, dtype=torch.long, device=completion_ids.device
    )
