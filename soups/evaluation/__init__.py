"""Stage 3, evaluation: scoring a base model with or without an adapter on a task's rows.

- `evaluate`: loading a model and adapter, generation, completion loss, `evaluate_rows`;
- `resident`: one base model kept in memory that scores many adapters side by side;
- `scoring`: the scorers (final number, program, exact match, loss);
- `sandbox/`: model-generated programs run under bubblewrap, seccomp and a memory cgroup;
- `adapter_kinds`: adapter folders other than a PEFT LoRA, registered by the stage that
  makes them (the mixture of LoRA experts registers from `soups.compose.moe`).

Imports training, data and the foundations; never compose.
"""
