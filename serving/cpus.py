"""How many threads the engine computes with on CPU and, when it leaves cores to the API process,
which cores are whose.

Unpinned, the API process and its clients' wake-ups land on the engine's cores and preempt a
step in the middle; measured on 2 cores with the demo model at concurrency 16 (six alternating
pairs of runs, one server), pinning gave 11% more output tokens per second. vLLM's CPU backend
binds its OpenMP threads for the same reason. Linux only: elsewhere the OS schedules as it likes.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_cpus(cgroup_root: Path) -> float | None:
    """The CPU limit a container runtime set (a Kubernetes pod's resources.limits.cpu), in cores:
    cgroup v2's cpu.max, else v1's cfs quota; None when unlimited or unknown."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on, capped by its container's CPU limit (a pod limited to 2 CPUs
    on a 64-core node sees 64 cores but gets the time of 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _quota_cpus(cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


# Weights from which a step outweighs the API process's per-token work (detokenizing, SSE): the
# engine then computes on every core. Measured on 2 cores (bench.serving_bench / bench.cpu_bench,
# c16): SmolLM2-135M, 94 MB as Q4_1 and 540 MB in float32, made 25-40% more tokens/s with 2 engine
# threads than with 1 pinned; the 1 MB demo made half as many (its steps take ~1 ms, the API's share
# of the work is as large, and an engine on both cores preempts it).
COMPUTE_BOUND_WEIGHT_BYTES = 32 << 20


def default_threads(weight_bytes: int | None = None, budget: float | None = None) -> int:
    """Engine threads when --num-threads is not given: every usable core for a model whose weights
    make the step compute-bound (>= COMPUTE_BOUND_WEIGHT_BYTES), else all but one, left to the API
    process (unknown size: all but one). `budget` (--cpus, whole cores of it) caps the usable cores."""
    cores = usable_cpus()
    if budget is not None:
        cores = max(1, min(cores, math.floor(budget)))
    if weight_bytes is not None and weight_bytes >= COMPUTE_BOUND_WEIGHT_BYTES:
        return cores
    return max(1, cores - 1)


def engine_cpus(threads: int, cgroup_root: Path = CGROUP_ROOT) -> tuple[int, ...]:
    """The cores the engine keeps to itself: the last `threads` of those this process may use. None
    when there are no more cores than engine threads (nothing left for the API), or when a CPU
    limit grants less time than those cores: then the cores are shared with other containers, and
    every FleetLM container would pin its engine to the same one."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= threads or usable_cpus(cgroup_root) < len(allowed):
        return ()
    return tuple(allowed[-threads:])


def pin_process(cpus: set[int] | tuple[int, ...]) -> None:
    """Restrict every thread of this process (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)
