"""Metric and tag names: the contract between the writers of a study's MLflow runs and Tune
results (`trainables/`, `study/`) and their readers (`analysis/`, the notebooks in
`analysis/notebooks/`, `study.selection`). Pure: standard library only, so every package may
import it (`analysis/` may not import `trainables/`).

Run tags (`trainables.tracking.tracked_run` writes them on every run; `analysis.runs.load_study`
reads them):
- STUDY_TAG `soups.study`: the study name (runs of another study in the experiment are skipped);
- ROLE_TAG `soups.role`: ROLE_PARENT `parent` (one per study, `study.runner`), ROLE_FINETUNE
  `finetune` (one per stage-1 fine-tune, `study.stage1`), ROLE_TRIAL `trial` (one per Tune
  trial, `trainables.trial_run`);
- KEY_TAG `soups.run_key`: the run's key; a resumed study finds its run again by it, and the
  analysis keeps one trial run per key;
- PARENT_TAG `mlflow.parentRunId`, RUN_NAME_TAG `mlflow.runName`: MLflow's own run nesting
  and run name;
- MLflow's own source tags (GIT_COMMIT_TAG `mlflow.source.git.commit`, its branch, whether the
  tree was dirty, `mlflow.source.name` and `.type`, `mlflow.user`) and `version_tag(package)`
  `version.<package>`: the code the run ran (`trainables.tracking.environment_tags`).

Experiment tags (`trainables.tracking.experiment_id`): EXPERIMENT_KIND_TAG
`mlflow.experimentKind` = EXPERIMENT_KIND (the UI opens a study's experiment on its runs, not on
the GenAI overview it guesses for an untagged one) and the primary metric, the objective.

Trial run tags (`trainables.trial_run`): METHOD_TAG `method` (the candidate's method; the
analysis falls back to it when the run has no `method` param), TRIAL_ID `trial_id` (Tune's
trial id, the analysis's `trial` column; Tune also puts it in every result, which
`study.selection` reads). Cluster trials (`trainables.cluster_trial`) add NODE_TAG
`soups.work_nodes` (Ray node ids that ran the trial's work, in order, comma-separated),
LOSS_TAG `soups.node_losses` (attempts whose node was lost) and DRIVER_TAG `soups.driver_node`
(the Ray node id of the trial driver, the head).

Fine-tune run tags (`study.stage1`): SKILL_TAG `skill` (the skill, or `data_mix`) and
CACHE_KEY_TAG `cache_key` (the adapter cache entry). Parent run tags (`study.runner`):
BEST_TRIAL_TAG `best_trial` and BEST_METHOD_TAG `best_method`, the selected trial.

Trial metrics (`trainables.merge_trial`; logged to the trial run and reported to Tune):
- `task_metric(split, task, metric)` `<split>/<task>/<metric>`: a task's score on a split
  (VALIDATION for every trial, TEST for the selected one only, `study.selection`); the metric is
  ACCURACY `accuracy`, a partial score of the task's scorer (`soups.evaluation.scoring`; every
  generating scorer gives PARSED `parsed`, the share of answers it could read), or EVAL_SECONDS
  `eval_seconds` (time to score it). `split_task_metric(key)` and `accuracy_task(key)` parse
  them back;
- OBJECTIVE `objective`: the validation accuracy on the target task, which the search
  maximises; a trial without it was stopped early. Also the leaderboard's and the analysis's
  trial-table column of that name;
- BUILD_SECONDS `build_seconds`: time to build the candidate (merge, CAT training, ...);
- learned CAT, at each held-out evaluation: CAT_STEP `cat_step` (the step: Tune's time
  attribute for ASHA and the MLflow step of these metrics, not logged itself), CAT_EVAL_LOSS
  `cat_eval_loss` (held-out loss: ASHA's metric), CAT_TRAIN_LOSS `cat_train_loss`; at the end
  CAT_TRAINABLE_PARAMETERS `cat_trainable_parameters`, CAT_BEST_EVAL_LOSS `cat_best_eval_loss`
  and CAT_BEST_STEP `cat_best_step` (the mixture of LoRA experts reports its router's
  training under the same names, so ASHA ranks both);
- a gradient-free weight search (LoraHub), at each evaluation of its objective: SEARCH_STEP
  `search_step` (the MLflow step, not logged itself), SEARCH_LOSS `search_loss` (mean loss on
  the skill-mix examples) and SEARCH_OBJECTIVE `search_objective` (loss + L1 term); at the end
  SEARCH_BEST_OBJECTIVE `search_best_objective`. `progress_step(metrics)`: the step of an
  intermediate result, whichever kind reported it;
- MLFLOW_RUN_ID `mlflow_run_id`: in the final Tune result only, the trial's MLflow run.

Fine-tune metrics (`study.stage1`, from the training history that `soups.training.lora_training` and
`trainables.finetune_worker` record): TRAIN_LOSS `train_loss`, EVAL_LOSS `eval_loss`, EPOCH
`epoch` per step; WALL_SECONDS `wall_seconds` and TOKENS `tokens` when trained.

Parent run metrics (`study.runner`, `study.selection`): `best_metric(key)` `best/<key>`, the
selected trial's test metrics; BEST_OBJECTIVE `best/validation_objective`, BEST_TEST_ACCURACY
`best/test_accuracy`; WALL_SECONDS `wall_seconds`, the study's run time. With several seeds
(`study.seeds`) these are the selected candidate's means over its seeds, and
BEST_OBJECTIVE_STDERR `best/validation_objective_stderr` and BEST_TEST_STDERR
`best/test_accuracy_stderr` their standard errors.
"""

from __future__ import annotations

# Tags of every run.
STUDY_TAG = "soups.study"
ROLE_TAG = "soups.role"
KEY_TAG = "soups.run_key"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# Tags of a study's experiment (values the MLflow UI reads).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC_GREATER_TAG = "mlflow.experiment.primaryMetric.greaterIsBetter"
# Values of ROLE_TAG.
ROLE_PARENT = "parent"
ROLE_FINETUNE = "finetune"
ROLE_TRIAL = "trial"
# Tags of a trial run (TRIAL_ID is also a key of every Tune result).
METHOD_TAG = "method"
TRIAL_ID = "trial_id"
TRIAL_NAME_TAG = "soups.tune_trial"
NODE_TAG = "soups.work_nodes"
LOSS_TAG = "soups.node_losses"
DRIVER_TAG = "soups.driver_node"
# Tags of a fine-tune run and of the parent run.
SKILL_TAG = "skill"
CACHE_KEY_TAG = "cache_key"
BEST_TRIAL_TAG = "best_trial"
BEST_METHOD_TAG = "best_method"

# Splits and metrics of `task_metric` keys.
VALIDATION = "validation"
TEST = "test"
ACCURACY = "accuracy"
PARSED = "parsed"  # share of answers the task's scorer could read (soups.evaluation.scoring)
EVAL_SECONDS = "eval_seconds"
# Trial metrics.
OBJECTIVE = "objective"
BUILD_SECONDS = "build_seconds"
CAT_STEP = "cat_step"
CAT_EVAL_LOSS = "cat_eval_loss"
CAT_TRAIN_LOSS = "cat_train_loss"
CAT_TRAINABLE_PARAMETERS = "cat_trainable_parameters"
CAT_BEST_EVAL_LOSS = "cat_best_eval_loss"
CAT_BEST_STEP = "cat_best_step"
SEARCH_STEP = "search_step"
SEARCH_LOSS = "search_loss"
SEARCH_OBJECTIVE = "search_objective"
SEARCH_BEST_OBJECTIVE = "search_best_objective"
STEP_KEYS = (CAT_STEP, SEARCH_STEP)  # metrics that give an intermediate result's step
MLFLOW_RUN_ID = "mlflow_run_id"
# Fine-tune metrics.
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EPOCH = "epoch"
TOKENS = "tokens"
WALL_SECONDS = "wall_seconds"
# Parent run metrics.
BEST_PREFIX = "best/"
BEST_OBJECTIVE = "best/validation_objective"
BEST_TEST_ACCURACY = "best/test_accuracy"
BEST_OBJECTIVE_STDERR = "best/validation_objective_stderr"
BEST_TEST_STDERR = "best/test_accuracy_stderr"
DATA_PREFIX = "data"  # parent run: each task's rows per role, and decontamination
DECONTAMINATED = "decontaminated"  # train rows removed: they are target evaluation rows


def candidate_label(method: str | None, rank=None, params: dict | None = None,
                    seed=None) -> str:
    """A candidate's short name, the same in the terminal, the MLflow run name, the report and
    the model card: `ties r8 (density=0.75)`, with ` seed 1` on a seed axis. Only what a
    trial varies goes in; a missing value (None, NaN) is left out."""
    def present(value) -> bool:
        return value is not None and value == value  # NaN != NaN

    shown = ", ".join(f"{k}={v}" for k, v in sorted((params or {}).items()) if present(v))
    rank_text = f" r{int(rank)}" if present(rank) else ""
    seed_text = f" seed {int(seed)}" if present(seed) else ""
    return f"{method or '?'}{rank_text}" + (f" ({shown})" if shown else "") + seed_text


def version_tag(package: str) -> str:
    """The tag holding a package's version: `version.torch`."""
    return f"version.{package}"


def task_metric(split: str, task: str, metric: str = ACCURACY) -> str:
    """A task's metric on a split: `task_metric("validation", "math")` is
    `validation/math/accuracy`."""
    return f"{split}/{task}/{metric}"


def split_task_metric(key) -> tuple[str, str, str] | None:
    """(split, task, metric) of a `task_metric` key; None for any other key."""
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 3 or not all(parts):
        return None
    split, task, metric = parts
    return split, task, metric


def accuracy_task(key, split: str = VALIDATION) -> str | None:
    """The task of a `<split>/<task>/accuracy` key; None for any other key."""
    parsed = split_task_metric(key)
    if parsed is None or parsed[0] != split or parsed[2] != ACCURACY:
        return None
    return parsed[1]


def data_metric(task: str, what: str) -> str:
    """A parent-run metric about a task's data: `data/math/train_rows`."""
    return f"{DATA_PREFIX}/{task}/{what}"


def best_metric(key: str) -> str:
    """The parent run's copy of the selected trial's metric: `best/test/math/accuracy`."""
    return f"{BEST_PREFIX}{key}"


def progress_step(metrics: dict) -> int | None:
    """The step of an intermediate trial result (CAT's evaluation, LoraHub's search), or
    None for a result without one."""
    for key in STEP_KEYS:
        if key in metrics:
            return int(metrics[key])
    return None
