"""Where a trial's work goes: on a cluster (cluster.yaml) the head offers the trial-driver
resource and the work goes to worker nodes; on one machine everything runs where Ray puts it."""

from __future__ import annotations


def on_cluster(driver_resource: str) -> bool:
    """True when the connected Ray instance offers the trial-driver resource."""
    import ray  # lazy: ray

    return bool(driver_resource) and ray.cluster_resources().get(driver_resource, 0) > 0
