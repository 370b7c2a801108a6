"""The Ray Tune trial on one node: build one candidate model, score it on validation splits,
report (`tune.with_parameters(merge_trial, context=...)`).

A trial's `variant` names a kind of candidate (`trainables/candidates.py`, the registry:
`base`, `skill`, `data_mix`, `cat_learned`, every merge method, ...), whose builder returns
the adapter folder to evaluate (None = the base model alone). The life cycle (its MLflow run,
progress reports, checkpoint) is `trainables/trial_run.py`, shared with the cluster trial
(`trainables/cluster_trial.py`); the scoring is the study's resident evaluators'
(`trainables/evaluator.py`).
"""

from __future__ import annotations

from trainables.evaluator import score_validation
from trainables.trial_context import ADAPTER_DIR, GENERATIONS_DIR, TrialContext
from trainables.trial_run import build_candidate, candidate_artifacts, trial_run


def merge_trial(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable (`tune.with_parameters(merge_trial, context=...)`): the
    whole trial in this process."""
    variant = config["variant"]
    with trial_run(context, variant) as run:
        out_dir = run.work_dir / ADAPTER_DIR
        adapter, build_seconds = build_candidate(context, variant, out_dir, run.progress)
        generations = run.work_dir / GENERATIONS_DIR
        metrics = score_validation(context, adapter, build_seconds, generations)
        artifacts = candidate_artifacts(variant, out_dir, run.work_dir, context.skills)
        run.finish(metrics, adapter, {**artifacts, GENERATIONS_DIR: generations})
