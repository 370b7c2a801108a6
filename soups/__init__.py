"""The core library: stages bottom to top, each importing only the stages below it
(tests/test_layering.py): the foundations at this root, `data`, `training`, `evaluation`,
then `tasks` and `compose` side by side. docs/extending.md shows the tree.

This root registers the adapter kinds the core ships with evaluation (the mixture of LoRA
experts that `compose` trains), by marker file and entry points: evaluation accepts them
without importing the stage that makes them, and importing `soups` loads nothing else.
"""

from soups.evaluation.adapter_kinds import AdapterKind, register

register(AdapterKind(
    name="moe", marker="moe.json",  # soups.adapters.MOE_CONFIG_FILE
    install_entry="soups.compose.moe.load:install_moe",
    installed_entry="soups.compose.moe.load:installed_moe"))
