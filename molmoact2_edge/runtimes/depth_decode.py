"""MolmoAct2-Think depth codes on the device: exact speculative decoding with the depth cache as the draft.

The reference order (``model.policy.Policy.decode_depth``, reference §4.13): feed ``<depth_start>``;
for each of the N cells either replay the cached code (the cell's pixels did not change) or take
the argmax over the depth rows of the logits after the previous token; feed the code; then
greedy full-vocabulary tokens until ``<depth_end>`` has been fed (at most ``tail_budget``).
``decode_sequential`` does exactly that, one ``decode_step`` call per token (1 + N + tail calls).

``decode_speculative`` gives the same tokens in far fewer calls. The whole frame is written
down before anything runs: ``<depth_start>``, every cell's cached code (a changed cell's cached
code stands in as its draft) and ``<depth_end>`` as the draft of the first tail token. One
``decode_block`` call feeds that sequence (k = N + 2 tokens) and returns, after every token,
the argmax over the depth rows and over the whole vocabulary. Walking the sequence in order:
a replayed cell is never checked; at a predicted position (a changed cell, or the first tail token)
the prediction is exact as long as every earlier token was right, so where it equals the
draft the walk goes on, and at the first difference the prediction replaces the draft, the
block's tokens after it are dropped (their cache slots are rewritten by the next call) and
the next call starts there; the changed cells behind it are redrafted with that call's own
predictions for them (made after the one wrong token: usually right, where the cached code of a
cell whose pixels changed often is not). So a frame costs 1 + (drafts rejected) calls, where a
rejected draft is a changed cell whose code differs from its draft, and the result is identical to
sequential decoding by construction. Should the model not close the span right after the
codes (a rejected ``<depth_end>`` draft, rare after training), the rest of the greedy tail is
decoded with ``decode_step``: there is no draft worth a block call beyond it.
Why this scheme and not another: a rejection must cost a call (the tokens after a changed
code depend on it), so no exact scheme needs fewer calls than 1 + rejections without
guessing the new code; with the cache as the draft the unchanged cells (about 83 % on sim
episodes) and the changed cells that kept their code cost nothing extra, and redrafting makes
the guesses for the others.

A camera's very first frame has no drafts: it is decoded sequentially. A new episode's first frame
re-predicts every cell with the codes of the camera's last frame as drafts (``DepthCache``); when
drafts are poor (block calls that advance fewer tokens each than a block costs in steps), the
rest of the frame is stepped, so bad drafts cost a few block calls at most. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# A block call costs a few step calls (so101-touch-think on this CPU; benchmarks/think_depth.py's rows give the ms
# per call with the cache and sequentially). Once at least
# MIN_BLOCKS_JUDGED block calls have advanced fewer than STEPS_PER_BLOCK tokens each on average, the rest of the
# frame is stepped: poor drafts (a first frame drafted from another episode) then cost at most about what
# sequential decoding does (c blocks + (n - 3c) steps), good ones a fraction of it. Both numbers were tuned on
# sim first frames, whose first rejections come in the first rows: judging after 3 calls, or asking 4 tokens
# per call, switched on frames that the blocks went on to finish in ~10 calls.
STEPS_PER_BLOCK = 3
MIN_BLOCKS_JUDGED = 8


def depth_block_length(num_cells: int) -> int:
    """k of the ``decode_block`` graph: ``<depth_start>``, one code per cell and ``<depth_end>`` in one call."""
    return num_cells + 2


def depth_token_mask(ids: np.ndarray, token_ids: Mapping[str, int]) -> np.ndarray:
    """Bool mask of ``ids`` at <depth_output>, <depth_start>, <depth_end> and <depth_i>: the positions the
    expert's depth gate scales (numpy twin of ``model.masks.depth_token_mask``)."""
    marks = [
        token_ids[k]
        for k in ("depth_output_token_id", "depth_start_token_id", "depth_end_token_id")
        if k in token_ids
    ]
    out = np.isin(ids, np.asarray(marks, dtype=np.int64))
    first, count = token_ids.get("depth_token_start_id"), token_ids.get("num_depth_tokens", 0)
    if first is not None and count:
        out |= (ids >= first) & (ids < first + count)
    return out


@dataclass(frozen=True)
class DepthTokens:
    """The token ids of the depth span."""

    start: int  # <depth_start>
    end: int  # <depth_end>
    first_code: int  # <depth_0>
    num_codes: int  # depth-code rows of the vocabulary (128)

    @classmethod
    def from_ids(cls, ids: Mapping[str, int]) -> DepthTokens:
        """From a bundle's ``prompt.token_ids`` (or ``config_token_ids``)."""
        return cls(
            int(ids["depth_start_token_id"]),
            int(ids["depth_end_token_id"]),
            int(ids["depth_token_start_id"]),
            int(ids["num_depth_tokens"]),
        )


@dataclass
class DepthStats:
    """What one frame's depth stage did (kept in ``chunk.info``, telemetry and ``bench``)."""

    cells_repredicted: int  # cells whose code was predicted (changed pixels, or no previous frame)
    drafts_rejected: int = 0  # predictions that differed from their draft (the <depth_end> draft included)
    block_calls: int = 0  # decode_block graph calls
    step_calls: int = 0  # decode_step graph calls
    stepped_from: int | None = None  # speculative: the position from which the frame was stepped (poor drafts)

    @property
    def graph_calls(self) -> int:
        return self.block_calls + self.step_calls

    def info(self) -> dict[str, int]:
        """The ``chunk.info`` entries (``depth_`` prefixed)."""
        return {
            "depth_cells_repredicted": self.cells_repredicted,
            "depth_drafts_rejected": self.drafts_rejected,
            "depth_block_calls": self.block_calls,
            "depth_graph_calls": self.graph_calls,
        }


@dataclass
class DepthResult:
    codes: np.ndarray  # (N,) int64 code per cell (0..num_codes-1)
    tokens: list[int]  # every token fed, <depth_start> first
    stats: DepthStats


class Decoder(Protocol):
    """The decoder state of one ``act`` as the depth stage drives it (``session._ContextDecoder``)."""

    block_length: int  # k; 0 when the bundle has no decode_block graph

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next slot; the logits (v,) after it."""
        ...

    def block(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Feed up to k tokens at the next slots in one call; after each token, (argmax over the depth rows
        as a code index (n,), argmax over the vocabulary (n,): valid after the last two tokens at least)."""
        ...

    def drop(self, count: int) -> None:
        """Forget the last ``count`` tokens fed (their slots are free again)."""
        ...


def decode_depth(
    decoder: Decoder,
    ids: DepthTokens,
    previous: np.ndarray | None,
    changed: np.ndarray,
    tail_budget: int,
    speculative: bool = True,
) -> DepthResult:
    """The frame's depth codes: speculative when there are drafts and a block graph, else sequential.

    A camera's first frame has no drafts: it is decoded one step per token. Self-drafted blocks (Jacobi iteration
    from placeholder codes) were tried for it and accepted only ~1.9 tokens per call on sim frames, more than a
    block call is worth in steps (``STEPS_PER_BLOCK``)."""
    if speculative and previous is not None and decoder.block_length > 0:
        return decode_speculative(decoder, ids, previous, changed, tail_budget)
    return decode_sequential(decoder, ids, previous, changed, tail_budget)


def decode_sequential(
    decoder: Decoder, ids: DepthTokens, previous: np.ndarray | None, changed: np.ndarray, tail_budget: int
) -> DepthResult:
    """The reference order, one ``step`` per token. previous None: every cell is predicted."""
    n = len(changed)
    predicted = np.ones(n, dtype=bool) if previous is None else np.asarray(changed, dtype=bool)
    stats = DepthStats(cells_repredicted=int(predicted.sum()))
    given = np.zeros(n, dtype=np.int64) if previous is None else np.asarray(previous)
    seq = [ids.start, *(ids.first_code + int(code) for code in given)]  # predicted cells are overwritten
    stats.step_calls = _step_rest(decoder, ids, seq, predicted, 0, tail_budget)
    codes = _codes(seq, n, ids)
    return DepthResult(codes, seq, stats)


def _codes(seq: list[int], n: int, ids: DepthTokens) -> np.ndarray:
    """The (n,) code indices of a fed depth span (``seq[0]`` is <depth_start>)."""
    return np.asarray(seq[1 : n + 1], dtype=np.int64) - ids.first_code


def _step_rest(
    decoder: Decoder, ids: DepthTokens, seq: list[int], predicted: np.ndarray, done: int, tail_budget: int
) -> int:
    """Feed ``seq[done:]`` one ``step`` each, in the reference order: a predicted cell's code (and the first token
    after the codes) is the argmax after the token before it, the others are given. ``seq`` holds <depth_start>,
    one code per cell and a last entry, and ends as every token fed; ``seq[done]`` must already be final.
    Returns the step calls made."""
    n = len(predicted)
    calls = 0
    for pos in range(done, n + 1):
        logits = decoder.step(seq[pos])
        calls += 1
        if pos < n and predicted[pos]:  # the logits after position pos predict cell pos (at position pos + 1)
            seq[pos + 1] = ids.first_code + int(np.argmax(logits[ids.first_code : ids.first_code + ids.num_codes]))
    del seq[n + 1 :]
    return calls + _greedy_tail(decoder, ids, seq, int(np.argmax(logits)), tail_budget)


def _greedy_tail(decoder: Decoder, ids: DepthTokens, tokens: list[int], token: int, budget: int) -> int:
    """Feed ``token`` and greedy tokens after it until <depth_end> has been fed (at most ``budget``); appends
    them to ``tokens`` and returns how many step calls that took."""
    fed = 0
    while fed < budget:
        tokens.append(token)
        logits = decoder.step(token)
        fed += 1
        if token == ids.end:
            break
        token = int(np.argmax(logits))
    return fed


def decode_speculative(
    decoder: Decoder,
    ids: DepthTokens,
    previous: np.ndarray,
    changed: np.ndarray,
    tail_budget: int,
    redraft: bool = True,
) -> DepthResult:
    """Same tokens as ``decode_sequential``, in 1 + (drafts rejected) block calls (see the module doc).

    redraft: after a rejection, the changed cells behind it take the block's own predictions there as their
    new drafts instead of their cached codes. Those predictions were made after one wrong token, usually
    far back, so they tend to be right where the cached code (the scene changed there) is not. Exactness
    is unaffected: a draft only decides how far a call gets, never what is accepted."""
    n = len(changed)
    changed = np.asarray(changed, dtype=bool)
    seq = [ids.start, *(ids.first_code + int(c) for c in previous), ids.end]  # the drafts
    stats = DepthStats(cells_repredicted=int(changed.sum()))
    k = decoder.block_length
    done = 0  # tokens of seq fed and final
    tail: int | None = None  # the first tail token, when it is not <depth_end>
    while done < len(seq) and tail is None:
        if stats.block_calls >= MIN_BLOCKS_JUDGED and done < STEPS_PER_BLOCK * stats.block_calls and done <= n:
            # the drafts are poor (a first frame drafted from another scene): stepping the rest costs less
            stats.stepped_from = done
            stats.step_calls = _step_rest(decoder, ids, seq, changed, done, tail_budget)
            return DepthResult(_codes(seq, n, ids), seq, stats)
        block = seq[done : done + k]
        depth_argmax, token_argmax = decoder.block(block)
        stats.block_calls += 1
        kept = len(block)
        for j in range(len(block)):
            nxt = done + j + 1  # the token the logits after block[j] predict
            if nxt > n + 1:
                break
            if nxt <= n and not changed[nxt - 1]:
                continue  # a replayed cell: its code is given, not predicted
            pred = ids.first_code + int(depth_argmax[j]) if nxt <= n else int(token_argmax[j])
            if pred == seq[nxt]:
                continue
            stats.drafts_rejected += 1
            if nxt > n:  # the model goes on after the codes: the tail is decoded step by step below
                tail = pred
                del seq[nxt:]
            else:
                seq[nxt] = pred
                if redraft:
                    _redraft(seq, changed, depth_argmax, ids, after=nxt, offset=done + 1)
            if nxt < done + len(block):  # the block fed the wrong draft at nxt: drop it and what follows
                kept = j + 1
            break
        if kept < len(block):
            decoder.drop(len(block) - kept)
        done += kept
    if tail is not None:  # rare after training: no draft beyond <depth_end> is worth a block call
        stats.step_calls = _greedy_tail(decoder, ids, seq, tail, tail_budget)
    codes = _codes(seq, n, ids)
    return DepthResult(codes, seq, stats)


def _redraft(
    seq: list[int], changed: np.ndarray, depth_argmax: np.ndarray, ids: DepthTokens, after: int, offset: int
) -> None:
    """Redraft the changed cells of ``seq`` behind position ``after`` from a block call's depth argmaxes
    (``depth_argmax[j]`` predicted ``seq[offset + j]``)."""
    n = len(changed)
    for pos in range(after + 1, min(n, offset + len(depth_argmax) - 1) + 1):
        if changed[pos - 1]:
            seq[pos] = ids.first_code + int(depth_argmax[pos - offset])
