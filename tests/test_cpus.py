"""The engine/API core split and the container CPU limit behind the default thread count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cpus import COMPUTE_BOUND_WEIGHT_BYTES, default_threads, engine_cpus, usable_cpus
from tests.server_util import free_port, wait_healthy


def test_a_container_cpu_limit_caps_the_usable_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == cores  # no cgroup files: the affinity set
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # limits.cpu: 1500m
    assert usable_cpus(tmp_path) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == cores
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_default_threads_follow_the_model_size_and_the_cpu_budget():
    cores = usable_cpus()
    big = COMPUTE_BOUND_WEIGHT_BYTES
    assert default_threads(big) == cores  # compute-bound: every core
    assert default_threads(big - 1) == default_threads(None) == max(1, cores - 1)  # one left to the API
    assert default_threads(big, budget=0.5) == 1
    assert default_threads(big, budget=cores + 3.7) == cores  # a budget never adds cores
    assert default_threads(big, budget=1.9) == 1  # whole cores of it
    assert default_threads(0, budget=2) == 1


def test_engine_cores_leave_at_least_one_to_the_api_and_are_never_shared_cores(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    assert engine_cpus(len(allowed), tmp_path) == ()
    if len(allowed) > 1:
        assert engine_cpus(1, tmp_path) == (allowed[-1],)
        assert engine_cpus(len(allowed) - 1, tmp_path) == tuple(allowed[1:])
        # A CPU limit below the cores this container sees: they are shared, so no pinning.
        (tmp_path / "cpu.max").write_text(f"{(len(allowed) - 1) * 100000} 100000\n")
        assert engine_cpus(1, tmp_path) == ()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _thread_affinities(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
@pytest.mark.parametrize("affinity", ["auto", "none"])
def test_the_server_splits_the_cores_between_engine_and_api(affinity, tmp_path):
    allowed = frozenset(os.sched_getaffinity(0))
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    # auto: the default thread count too (the demo's 1 MB of weights: all cores but one for the engine)
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_NUM_THREADS", "LLM_CPUS")}
    env["LLM_CPU_AFFINITY"] = affinity
    if affinity == "none":
        env["LLM_NUM_THREADS"] = "1"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            engines = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
            assert len(engines) == 1
            api_threads, engine_threads = _thread_affinities(proc.pid), _thread_affinities(engines[0])
        finally:
            proc.terminate()
            proc.wait(60)
    if affinity == "none":
        assert api_threads == engine_threads == {allowed}
    else:
        engine_set = frozenset(sorted(allowed)[1:])
        assert engine_threads == {engine_set}, "every engine thread, torch's included, on its own core"
        assert api_threads == {allowed - engine_set}
        logged = (tmp_path / "server.log").read_text()
        assert "CPU cores split" in logged
        assert f'"threads": {len(engine_set)}' in logged
