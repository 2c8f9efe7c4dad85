from dpo_engine.training.loop import (TrainingError, check_optim, extra_stop_rule, fsdp_settings, logged_metrics, pair_order, should_stop, total_steps, train, world)
from dpo_engine.training.master_weights import (MasterWeights)
