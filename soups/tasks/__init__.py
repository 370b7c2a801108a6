"""A study's tasks: what a task is (`task_spec`: its data source, prompt format, scorer and
generation settings, as a study file declares them) and its resolved rows and prompts
(`task_data`). A task names evaluation's scorer and generation settings, so it stands above
evaluation; training and evaluation take rows and prompts, never a task.

Imports evaluation, training, data and the foundations; never compose.
"""
