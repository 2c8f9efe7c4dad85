"""DPO training: the loop, its optimizer, checkpoints, distributed and FSDP runs, early stopping and
metrics. The public names used outside the package, re-exported from its modules."""

from dpo_engine.training.distributed import fsdp_settings, world
from dpo_engine.training.errors import TrainingError
from dpo_engine.training.loop import TrainResult, train
from dpo_engine.training.master_weights import MasterWeights
from dpo_engine.training.observability import logged_metrics
from dpo_engine.training.optim import check_optim, pair_order, total_steps
from dpo_engine.training.stopping import extra_stop_rule, should_stop

__all__ = ["MasterWeights", "TrainResult", "TrainingError", "check_optim", "extra_stop_rule", "fsdp_settings",
           "logged_metrics", "pair_order", "should_stop", "total_steps", "train", "world"]
