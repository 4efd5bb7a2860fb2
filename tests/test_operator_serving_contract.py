"""The pods the operator renders run the serving program: its container args must parse with
the serving CLI and the downloader's, and point at the same model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from llm_operator.deployment import deployment
from llm_operator.naming import Owner
from llm_operator.spec import parse_spec

from serving.config import load_config
from serving.download import _parser as download_parser

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def _llmds(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMDeployment"]
    for d in docs:
        d["metadata"].update(namespace="ml", uid="uid-1")
    return docs


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_rendered_pods_speak_the_serving_cli(path):
    for body in _llmds(path):
        pod = deployment(Owner.of(body), parse_spec(body["spec"]), "ghcr.io/fleetlm/fleetlm:test")["spec"]["template"]["spec"]
        server = next(c for c in pod["containers"] if c["command"][-1] == "serving")
        env = {e["name"]: e.get("value", "") for e in server.get("env", []) if e["name"].startswith("LLM_")}
        cfg = load_config(server["args"], env)  # raises on any flag or value the server would refuse
        assert cfg.port == 8080
        assert cfg.served_model_name
        init = [c for c in pod.get("initContainers", []) if c["command"][-1] == "download"]
        if body["spec"]["model"].get("hf"):
            assert init, "a Hub model is downloaded by the init container"
            args = download_parser().parse_args(init[0]["args"])
            assert str(args.dest) == cfg.model_path
            assert args.model == body["spec"]["model"]["hf"]["repo"]
            if args.cache_root is not None:  # the directory of models the destination is among
                assert args.cache_root in args.dest.parents


def test_adapters_are_served_from_where_their_init_containers_put_them():
    body = {
        "metadata": {"name": "m", "namespace": "ml", "uid": "uid-1"},
        "spec": {"model": {"hf": {"repo": "org/m"}, "adapters": [{"name": "sql", "repo": "org/sql"}, {"name": "t", "repo": "org/t", "revision": "v2"}]}},
    }
    pod = deployment(Owner.of(body), parse_spec(body["spec"]), "img")["spec"]["template"]["spec"]
    cfg = load_config(pod["containers"][0]["args"], {})
    fetched = {}
    for init in pod["initContainers"][1:]:
        args = download_parser().parse_args(init["args"])
        fetched[args.model] = str(args.dest)
    assert {m.name: m.path for m in cfg.lora_modules} == {"sql": fetched["org/sql"], "t": fetched["org/t"]}
