"""The ``eval.benchmarks`` section: lm-evaluation-harness tasks run on the policy and on the reference."""

from __future__ import annotations

from pydantic import Field

from data_contracts.config.base import Name, Section

# what the benchmark step needs, said when it is missing (dpo_engine.evaluation.benchmarks)
LM_EVAL_PIP = "pip install 'lm-eval>=0.4.9,<0.5'"


class BenchmarksConfig(Section):
    tasks: list[Name] = Field(default_factory=list, description="lm-evaluation-harness tasks run on the "
                              "trained policy and on the reference, logged as bench/<task>/<metric>, "
                              "bench_ref/<task>/<metric> and bench_delta/<task>/<metric> (policy - reference): "
                              "registered task or group names (their datasets must be in the local Hugging "
                              "Face cache when offline), paths of local task YAML files, or folders (every "
                              "task defined under it). Relative paths in a local task YAML (dataset_kwargs."
                              "data_files, data_dir) are read from the YAML's folder. Empty: no benchmark "
                              "step. Needs the lm-eval package: " + LM_EVAL_PIP + ".")
    include_path: list[Name] = Field(default_factory=list, description="Folders of local task YAMLs whose "
                                     "task and group names `tasks` may use (they override registered ones "
                                     "of the same name).")
    limit: int | None = Field(None, ge=1, description="Documents per task (the first ones); null: all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; null: each "
                                    "task's own setting (0 when it has none). A task that sets 0 keeps 0.")
    batch_size: int = Field(8, ge=1, description="Requests (context + continuation) per forward pass.")
    bootstrap_iters: int = Field(1000, ge=0, description="Resamples for the standard errors of metrics "
                                 "without a closed form (a mean's is exact); the errors are logged as "
                                 "bench/<task>/<metric>_stderr. 0: no standard errors.")
