"""Models: loading, PEFT adapters, batches of sequences, their log-probs through the fused head, and
the preference losses. The public names used outside the package, re-exported from its modules."""

from dpo_engine.modeling.batching import collate, pack, pair_batch
from dpo_engine.modeling.fingerprints import model_fingerprint, tokenizer_fingerprint
from dpo_engine.modeling.fused_head import CCE_FILTER_EPS, naive_token_logps, token_logps
from dpo_engine.modeling.loading import (LOAD_LOCK, ModelError, autocast, autocast_dtype, disable_dropout, is_vision_model,
                                         load_model,
                                         load_reference_model, load_tokenizer, packed_attention, pick_device,
                                         reference_model_path, resolve_model_path, seeded, set_seed)
from dpo_engine.modeling.logps import (compile_layers, ld_token_weights, lm_body_and_head, pair_logps, sequence_logps,
                                       unwrap_model)
from dpo_engine.modeling.losses import (PairLoss, dpo_loss, f_divergence, ld_weighted_logps, loss_from_config,
                                        pair_metrics, wpo_log_weight)
from dpo_engine.modeling.peft_adapters import (apply_adapter, check_config, export_model, is_peft, peft_config,
                                               reference_mode)
from dpo_engine.modeling.vision import (VisionInputs, check_vision_run, freeze_vision, language_model_peft,
                                        load_processor, processor_fingerprint)

__all__ = ["collate", "pack", "pair_batch", "model_fingerprint", "tokenizer_fingerprint", "CCE_FILTER_EPS",
           "naive_token_logps", "token_logps", "LOAD_LOCK", "ModelError", "autocast", "autocast_dtype",
           "disable_dropout", "load_model", "load_reference_model", "load_tokenizer", "packed_attention",
           "pick_device", "reference_model_path", "resolve_model_path", "seeded", "set_seed", "compile_layers",
           "ld_token_weights", "lm_body_and_head", "pair_logps", "sequence_logps", "unwrap_model", "PairLoss",
           "dpo_loss", "f_divergence", "ld_weighted_logps", "loss_from_config", "pair_metrics", "wpo_log_weight",
           "apply_adapter", "check_config", "export_model", "is_peft", "peft_config", "reference_mode",
           "VisionInputs", "check_vision_run", "freeze_vision", "is_vision_model", "language_model_peft",
           "load_processor", "processor_fingerprint"]
