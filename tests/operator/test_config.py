"""Operator flags and their FLEETLM_OPERATOR_* environment variables."""

from __future__ import annotations

import re

from llm_operator.config import parse_args


def test_defaults_serve_every_namespace_with_peering() -> None:
    config = parse_args([], env={})
    assert config.namespaces == () and config.clusterwide
    assert not config.standalone and config.peering == "fleetlm-operator"
    assert config.default_image.startswith("ghcr.io/fleetlm/fleetlm:")
    assert (config.health_port, config.metrics_port, config.resync_seconds) == (8081, 8080, 60)
    assert config.require_gpu_nodes and 0 <= config.priority <= 32767


def test_one_namespace_or_a_list() -> None:
    assert parse_args(["--namespaces", "ml"], env={}).namespaces == ("ml",)
    config = parse_args(["--namespaces", "ml, research,"], env={})
    assert config.namespaces == ("ml", "research") and not config.clusterwide


def test_environment_sets_defaults_and_flags_win() -> None:
    env = {
        "FLEETLM_OPERATOR_NAMESPACES": "a,b",
        "FLEETLM_OPERATOR_STANDALONE": "true",
        "FLEETLM_OPERATOR_REQUIRE_GPU_NODES": "false",
        "FLEETLM_OPERATOR_PRIORITY": "7",
        "FLEETLM_OPERATOR_DEFAULT_IMAGE": "img:env",
    }
    config = parse_args([], env=env)
    assert config.namespaces == ("a", "b") and config.standalone and not config.require_gpu_nodes
    assert (config.priority, config.default_image) == (7, "img:env")
    flagged = parse_args(["--namespaces", "c", "--no-standalone", "--default-image", "img:flag"], env=env)
    assert flagged.namespaces == ("c",) and not flagged.standalone and flagged.default_image == "img:flag"


def test_replicas_get_distinct_priorities_by_default() -> None:
    # Peering lets only the highest priority work: equal priorities would make both replicas active.
    assert len({parse_args([], env={}).priority for _ in range(20)}) > 1


def test_cpu_pods_get_the_cpu_image_and_the_defaults_match_the_chart() -> None:
    from llm_operator.reconciler import Reconciler
    from llm_operator.spec import parse_spec

    from tests.operator.builders import llmd
    from tests.operator.test_chart import operator_env, render

    config = parse_args([], env={})
    assert config.default_image == "ghcr.io/fleetlm/fleetlm:0.1.0"
    assert config.default_cpu_image == "ghcr.io/fleetlm/fleetlm:0.1.0-cpu"
    chart = parse_args([], env=operator_env(render()))
    assert (chart.default_image, chart.default_cpu_image) == (config.default_image, config.default_cpu_image)
    reconciler = Reconciler(kube=None, config=config)  # type: ignore[arg-type]  # choosing an image needs no API
    cpu, gpu = parse_spec(llmd()["spec"]), parse_spec(llmd(resources={"gpu": {"count": 1}})["spec"])
    assert reconciler._default_image(cpu).endswith("-cpu") and reconciler._default_image(gpu) == config.default_image
    one = parse_args(["--default-cpu-image", ""], env={})
    assert Reconciler(kube=None, config=one)._default_image(cpu) == one.default_image  # type: ignore[arg-type]


def test_the_images_build_what_ci_tests() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text()
    serving = (root / "images" / "serving" / "Dockerfile").read_text()
    operator = (root / "images" / "operator" / "Dockerfile").read_text()
    torch = re.search(r"torch==([0-9.]+)", ci)[1]
    assert f"ARG TORCH_VERSION={torch}" in serving
    base = re.compile(r"ARG PYTHON_IMAGE=(\S+)")
    assert base.search(serving)[1] == base.search(operator)[1]  # one Python for both images


def _runtime_stage(dockerfile: str) -> list[str]:
    """The last stage's instructions, continuation lines joined."""
    lines = dockerfile.replace("\\\n", " ").splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    last = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last + 1 :]


def _image_env(stage: list[str]) -> dict[str, str]:
    return dict(
        pair.split("=", 1) for line in stage if line.upper().startswith("ENV ") for pair in line.split()[1:]
    )


def test_the_serving_image_runs_triton_as_uid_1000_on_a_read_only_root() -> None:
    """Triton compiles its launcher with gcc (against libc's headers) at first use on CUDA, and caches
    kernels under TRITON_HOME or the home, which for uid 1000 without a passwd entry is the read-only /.
    The pod gets the same environment as the image, so a custom image works too."""
    from pathlib import Path

    from llm_operator.deployment import BASE_ENV

    root = Path(__file__).resolve().parents[2]
    stage = _runtime_stage((root / "images" / "serving" / "Dockerfile").read_text())
    (install,) = [line for line in stage if line.startswith("RUN apt-get")]
    assert re.search(r"apt-get install -y --no-install-recommends gcc libc6-dev\b", install)
    assert "rm -rf /var/lib/apt/lists/*" in install
    env = _image_env(stage)
    assert env["HOME"] == "/tmp" and env["TRITON_HOME"] == "/tmp"
    pod_env = {e["name"]: e["value"] for e in BASE_ENV}
    assert pod_env.items() <= env.items()  # the pod sets nothing the image disagrees with
    assert {"HOME", "TRITON_HOME", "HF_HOME"} <= set(pod_env)
    assert all(value.startswith("/tmp") for name, value in pod_env.items() if name.endswith("HOME"))


def test_the_serving_image_has_the_sleep_the_pre_stop_hook_runs() -> None:
    """The server's preStop hook execs `sleep` (operator/deployment.py): the serving image's base is a
    Debian python image, whose coreutils provide it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dockerfile = (root / "images" / "serving" / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim$", dockerfile, re.MULTILINE)
    runtime_base = [line for line in dockerfile.splitlines() if line.startswith("FROM ")][-1]
    assert runtime_base == "FROM ${PYTHON_IMAGE}"  # not a distroless or scratch stage without coreutils
