"""Reference precompute over the ranks of a launched precompute stage."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch.distributed as dist

# Under ``accelerate launch`` (torch.distributed), rank 0 runs ``cached_reference_logps`` as above
# with ``compute = shard_across_ranks(local)``: for every missing shard it sends the shard's example
# ids to the other ranks, each rank computes its contiguous share with ``local``, and rank 0 gathers
# the shares in rank order and writes the shard itself. The cache format does not change; only rank 0
# touches the cache folder and its lock. The other ranks run ``follow_shards`` until rank 0 sends
# ``release_followers()``.

def _share(part: pd.DataFrame, rank: int, n_ranks: int) -> pd.DataFrame:
    n = len(part)
    return part.iloc[rank * n // n_ranks:(rank + 1) * n // n_ranks]


def shard_across_ranks(local: Callable[[pd.DataFrame, str], pd.DataFrame]
                       ) -> Callable[[pd.DataFrame, str], pd.DataFrame]:
    """Rank 0's ``compute(part, tag)``: the same frame as ``local(part, tag)``, computed by all ranks."""
    def compute(part: pd.DataFrame, tag: str) -> pd.DataFrame:
        n_ranks = dist.get_world_size()
        dist.broadcast_object_list([("work", tag, part["example_id"].tolist())], src=0)
        shares: list = [None] * n_ranks
        dist.gather_object(local(_share(part, 0, n_ranks), tag), shares, dst=0)
        return pd.concat(shares, ignore_index=True)

    return compute


def follow_shards(rows_of: Callable[[str], pd.DataFrame],
                  local: Callable[[pd.DataFrame, str], pd.DataFrame]) -> int:
    """A rank > 0: compute this rank's share of every shard rank 0 hands out (``rows_of(tag)`` holds
    the rows the example ids refer to) until rank 0 releases it. Returns the examples computed."""
    rank, n_ranks, done = dist.get_rank(), dist.get_world_size(), 0
    while True:
        msg: list = [None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0][0] == "done":
            return done
        _, tag, ids = msg[0]
        rows = rows_of(tag)
        part = rows.iloc[pd.Index(rows["example_id"]).get_indexer(ids)]
        mine = _share(part, rank, n_ranks)
        dist.gather_object(local(mine, tag), None, dst=0)
        done += len(mine)


def release_followers() -> None:
    """Rank 0: tell ``follow_shards`` on the other ranks that there is no more work."""
    dist.broadcast_object_list([("done",)], src=0)
