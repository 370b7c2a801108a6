"""LoraHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", https://arxiv.org/abs/2307.13269, code https://github.com/sail-sg/lorahub):
one weight per LoRA, found without gradients by Nevergrad's NGOpt on the few-shot loss of
the composed model plus 0.05 * mean |w|, then exported as one PEFT LoRA.

- `settings`: `LorahubSettings` (budget, examples, bounds, composition, l1, seed, init);
- `compose`: the `lorahub` (summed factors, LoraHub's code) and `exact` (concatenation)
  compositions;
- `model`: `ComposedLoras`, the base model loaded once with the composition overwritten in
  place per evaluation;
- `search`: `search_weights`, the seeded NGOpt ask/tell loop, and `LorahubResult`;
- `run`: `lorahub_merge`, all of the above end to end (what `soups merge --method lorahub`
  and a study trial call).

    from soups.compose.lorahub import LorahubSettings, lorahub_merge
    result = lorahub_merge(["math_lora", "code_lora"], "base_model", [math_rows, code_rows],
                           "merged", LorahubSettings(budget=40), on_evaluation=print)
"""

from soups.lazy import lazy_exports

# Each public name and the submodule that defines it, imported on first use: the command
# line reads the settings without torch or nevergrad.
_EXPORTS = {
    "LorahubError": "settings", "LorahubSettings": "settings", "compose_exact": "compose",
    "compose_lorahub": "compose", "ComposedLoras": "model", "LorahubResult": "search",
    "search_weights": "search", "lorahub_merge": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
