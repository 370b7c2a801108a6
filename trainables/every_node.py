"""Run one small function on every alive node of the Ray cluster (pre-flight checks)."""

from __future__ import annotations

from collections.abc import Callable

from soups.evaluation.sandbox import SandboxUnavailable, check_sandbox


def on_every_node(function: Callable, *args, timeout_s: float = 120) -> dict[str, object]:
    """`function(*args, node_id)` on each alive node (pinned there, no CPU reserved, no
    retry): node id -> its return value, or the `ray.exceptions.RayError` that stopped it.
    Needs `ray.init()` first."""
    import ray  # lazy: ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: ray

    task = ray.remote(function)
    refs = {node: task.options(num_cpus=0, max_retries=0,
                               scheduling_strategy=NodeAffinitySchedulingStrategy(
                                   node, soft=False)).remote(*args, node)
            for node in (n["NodeID"] for n in ray.nodes() if n["Alive"])}
    answers: dict[str, object] = {}
    for node, ref in refs.items():
        try:
            answers[node] = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayError as err:
            answers[node] = err
    return answers


def sandbox_problem(sandbox: str, node: str) -> str | None:
    """On one node: why programs cannot run in `sandbox` there, or None."""
    try:
        check_sandbox(sandbox)
    except SandboxUnavailable as err:
        return str(err)
    return None


def check_sandbox_on_nodes(sandbox: str, timeout_s: float = 120) -> list[str]:
    """Problems of the program sandbox, one line per node that has one."""
    problems = []
    for node, answer in on_every_node(sandbox_problem, sandbox, timeout_s=timeout_s).items():
        if isinstance(answer, Exception):
            problems.append(f"node {node}: the check could not run there "
                            f"({type(answer).__name__})")
        elif answer is not None:
            problems.append(f"node {node}: {answer}")
    return problems
