"""Batches of (prompt, completion) sequences, in one of two layouts.

Padded (``collate``: one sequence per row, right-padded) and packed (``pack``: all sequences in one
row, no padding, ``position_ids`` restarting at 0 for each sequence). ``seq_ids`` maps every position
to its sequence and ``predict_mask`` marks the positions whose hidden state predicts a completion
token, so the log-prob code is the same for both layouts; a sequence's last position predicts
nothing, so no prediction crosses a boundary. ``pair_batch`` lays out a micro-batch of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SeqBatch:
    """R rows of sequences in the padded or the packed layout, with what the log-prob code reads."""

    input_ids: torch.Tensor  # [R, T] rows: one right-padded sequence each, or one packed row
    attention_mask: torch.Tensor  # [R, T] 1 on real tokens
    predict_mask: torch.Tensor  # [R, T] True where the hidden state predicts a completion token
    targets: torch.Tensor  # [R, T] the token each position predicts (next token of its sequence)
    seq_ids: torch.Tensor  # [R, T] sequence index of each position (-1 on padding)
    num_seqs: int
    position_ids: torch.Tensor | None = None  # [1, T] packed layout only: restarts at 0 per sequence
    # further inputs of the model body (a vision-language model's pixel_values, ...: modeling.vision)
    extras: dict[str, torch.Tensor] | None = None

    def to(self, device) -> "SeqBatch":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return SeqBatch(**{f.name: ({k: move(x) for k, x in v.items()} if isinstance(v, dict) else move(v))
                           for f in fields(self) for v in [getattr(self, f.name)]})

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _check(prompts, completions):
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0 or len(c) == 0:
            raise ValueError(f"sequence {i}: prompt and completion must be non-empty")


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
            pad_to_multiple_of: int | None = None) -> SeqBatch:
    """Concatenate each prompt with its completion, right-pad (the row length rounded up to a
    multiple of ``pad_to_multiple_of`` when given), and mark completion predictions."""
    _check(prompts, completions)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    s, t = len(lengths), max(lengths)
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((s, t), pad_id, dtype=torch.long)
    att = torch.zeros((s, t), dtype=torch.long)
    pred = torch.zeros((s, t), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor([int(x) for x in p] + [int(x) for x in c])
        att[i, :n] = 1
        pred[i, len(p) - 1:n - 1] = True
    targets = torch.cat([ids[:, 1:], torch.full((s, 1), pad_id, dtype=torch.long)], dim=1)
    seq_ids = torch.where(att.bool(), torch.arange(s)[:, None], -1)
    return SeqBatch(ids, att, pred, targets, seq_ids, s)


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> SeqBatch:
    """All sequences in one row [1, sum of lengths], no padding, positions restarting at 0."""
    _check(prompts, completions)
    ids, pos, pred, tgt, sid = [], [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = [int(x) for x in p] + [int(x) for x in c]
        n = len(seq)
        ids += seq
        pos += range(n)
        pred += [False] * (len(p) - 1) + [True] * len(c) + [False]
        tgt += seq[1:] + [pad_id]  # the last position would predict the next sequence: masked
        sid += [i] * n
    row = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt)[None]  # noqa: E731
    return SeqBatch(row(ids), torch.ones(1, len(ids), dtype=torch.long), row(pred, torch.bool),
                    row(tgt), row(sid), len(prompts), position_ids=row(pos))


def pair_batch(rows: list[dict], pad_id: int, packed: bool = False,
               pad_to_multiple_of: int | None = None) -> SeqBatch:
    """2B sequences for B pairs: the B chosen first, then the B rejected (padded rows or packed)."""
    prompts = [r["prompt_input_ids"] for r in rows] * 2
    comps = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    if packed:
        return pack(prompts, comps, pad_id)
    return collate(prompts, comps, pad_id, pad_to_multiple_of)
