"""The reference side of DPO: log-probs computed once (:mod:`~dpo_engine.reference.compute`), cached
to Parquet and shared across runs (:mod:`~dpo_engine.reference.cache`), split over the ranks of a
launched stage (:mod:`~dpo_engine.reference.ranks`), and what training compares with
(:mod:`~dpo_engine.reference.sources`)."""

from dpo_engine.reference.cache import (
                                        COMPLETE,
                                        ENGINE_VERSION,
                                        CacheError,
                                        cached_reference_logps,
                                        read_cache,
                                        remove_leftovers,
                                        write_cache,
)
from dpo_engine.reference.compute import compute_reference_logps
from dpo_engine.reference.ranks import follow_shards, release_followers, shard_across_ranks
from dpo_engine.reference.sources import SOURCES, training_reference

__all__ = ["COMPLETE", "ENGINE_VERSION", "CacheError", "cached_reference_logps", "read_cache", "remove_leftovers",
           "write_cache", "compute_reference_logps", "follow_shards", "release_followers", "shard_across_ranks",
           "SOURCES", "training_reference"]
