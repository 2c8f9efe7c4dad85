"""A sweep: variants of one config (a grid of values, or a list of overrides), each trained and
evaluated, the best one registered.

- :mod:`~dpo_engine.sweep.grid`: parsing, expanding and checking variants; picking the best.
- :mod:`~dpo_engine.sweep.early_stop`: the shared board and the rule that stops a lagging variant.
- :mod:`~dpo_engine.sweep.parent_run`: the parent MLflow run and its children.
- :mod:`~dpo_engine.sweep.plan`: the sweep's course (configs, candidates, summary); imported by its
  path, since it builds on the pipeline. Where variants run is Prefect composition (``flows/sweep.py``).
"""

from dpo_engine.sweep.early_stop import (
                                         BOARD,
                                         DEFAULT_STOP_METRIC,
                                         STOP_METRICS,
                                         STOP_SPEC,
                                         Board,
                                         LaggingRule,
                                         best_at,
                                         check_stop_configs,
                                         eval_points,
                                         stop_options,
                                         stop_rule,
                                         write_stop_spec,
)
from dpo_engine.sweep.grid import (
                                         SWEEPABLE,
                                         best_index,
                                         check_key,
                                         check_parallel,
                                         expand_grid,
                                         parse_grid,
                                         parse_variant,
)
from dpo_engine.sweep.parent_run import adopt, close_parent, open_parent

__all__ = ["BOARD", "DEFAULT_STOP_METRIC", "STOP_METRICS", "STOP_SPEC", "Board", "LaggingRule", "best_at",
           "check_stop_configs", "eval_points", "stop_options", "stop_rule", "write_stop_spec", "SWEEPABLE",
           "best_index", "check_key", "check_parallel", "expand_grid", "parse_grid", "parse_variant", "adopt",
           "close_parent", "open_parent"]
