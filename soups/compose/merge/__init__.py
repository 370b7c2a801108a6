"""Merge engine: PEFT LoRA adapter folders in, one PEFT LoRA adapter folder out.

`merge_adapters(adapter_dirs, method, out_dir, **params)`; `list_methods()` and
`method_parameters(name)` describe the registered methods (methods.py).
"""

from soups.compose.merge.engine import list_methods, merge_adapters, method_parameters
from soups.compose.merge.registry import MergeError

__all__ = ["MergeError", "list_methods", "merge_adapters", "method_parameters"]
