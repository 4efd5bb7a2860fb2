"""Operator flags and their FLEETLM_OPERATOR_* environment variables."""

from __future__ import annotations

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
