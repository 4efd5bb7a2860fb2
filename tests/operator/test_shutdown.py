"""python -m llm_operator.shutdown (the chart's pre-delete hook) against the test API: it scales the
operator's Deployment to zero and returns once its pods are gone."""

from __future__ import annotations

import threading

from kubernetes.client import AppsV1Api, CoreV1Api
from llm_operator import shutdown
from llm_operator.kube import Kube

from tests.operator.conftest import private_api

# An API of this module's own: the session's running operator (the flow tests') would put its finalizer
# back on the LLMDeployments made here, as it does on any it serves.
apiserver, kube = private_api()

SELECTOR = {"app.kubernetes.io/name": "fleetlm-operator", "app.kubernetes.io/instance": "rel"}


def _deployment(name: str) -> dict:
    return {
        "metadata": {"name": name, "labels": SELECTOR},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": SELECTOR},
            "template": {"metadata": {"labels": SELECTOR}, "spec": {"containers": [{"name": "operator", "image": "x"}]}},
        },
    }


def test_scales_to_zero_and_waits_for_the_pods(kube: Kube, namespace: str, monkeypatch) -> None:
    monkeypatch.setattr(shutdown, "POLL_S", 0.05)
    apps, core = AppsV1Api(kube.api), CoreV1Api(kube.api)
    apps.create_namespaced_deployment(namespace, _deployment("rel-fleetlm-operator"))
    for i in range(2):
        core.create_namespaced_pod(namespace, {"metadata": {"name": f"op-{i}", "labels": SELECTOR},
                                               "spec": {"containers": [{"name": "operator", "image": "x"}]}})  # fmt: skip
    core.create_namespaced_pod(namespace, {"metadata": {"name": "other", "labels": {"app.kubernetes.io/name": "x"}},
                                           "spec": {"containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
    selector = ",".join(f"{k}={v}" for k, v in SELECTOR.items())
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(shutdown.scale_down(apps, core, namespace, "rel-fleetlm-operator", selector, 30))
    )
    worker.start()
    # Play the deployment controller: once replicas is 0, the operator pods go.
    import time

    deadline = time.monotonic() + 10
    while apps.read_namespaced_deployment("rel-fleetlm-operator", namespace).spec.replicas != 0:
        assert time.monotonic() < deadline, "never scaled to zero"
        time.sleep(0.02)
    assert worker.is_alive(), "returned while operator pods were still running"
    for i in range(2):
        core.delete_namespaced_pod(f"op-{i}", namespace)
    worker.join(10)
    assert result == [True]
    assert [p.metadata.name for p in core.list_namespaced_pod(namespace).items] == ["other"]


def test_a_missing_deployment_or_lingering_pods_do_not_block_the_uninstall(kube: Kube, namespace: str, monkeypatch) -> None:
    monkeypatch.setattr(shutdown, "POLL_S", 0.05)
    apps, core = AppsV1Api(kube.api), CoreV1Api(kube.api)
    assert shutdown.scale_down(apps, core, namespace, "absent", "app.kubernetes.io/name=none", 1) is True
    core.create_namespaced_pod(namespace, {"metadata": {"name": "stuck", "labels": {"app.kubernetes.io/name": "stuck"}},
                                           "spec": {"containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
    assert shutdown.scale_down(apps, core, namespace, "absent", "app.kubernetes.io/name=stuck", 0.2) is False


def test_the_operators_finalizer_comes_off_its_llmdeployments_and_only_it(kube: Kube, namespace: str) -> None:
    """After the operator has stopped, nothing would remove kopf's finalizer: deleting an LLMDeployment
    would hang in Terminating. Other finalizers stay; namespaces not served are left alone."""
    from kubernetes.client import CustomObjectsApi
    from llm_operator import naming

    custom = CustomObjectsApi(kube.api)

    def llmd(name: str, finalizers: list[str]) -> None:
        body = {"apiVersion": naming.API_VERSION, "kind": naming.KIND,
                "metadata": {"name": name, "finalizers": finalizers}, "spec": {"model": {"hf": {"repo": "org/m"}}}}  # fmt: skip
        custom.create_namespaced_custom_object(naming.GROUP, naming.VERSION, namespace, naming.PLURAL, body)

    llmd("ours", [naming.FINALIZER])
    llmd("shared", ["example.com/keep", naming.FINALIZER])
    llmd("none", [])
    assert shutdown.release_finalizers(custom, ["elsewhere"]) == 0
    assert shutdown.release_finalizers(custom, [namespace]) == 2
    left = {
        item["metadata"]["name"]: item["metadata"].get("finalizers") or []
        for item in custom.list_namespaced_custom_object(naming.GROUP, naming.VERSION, namespace, naming.PLURAL)["items"]
    }
    assert left == {"ours": [], "shared": ["example.com/keep"], "none": []}
    assert shutdown.release_finalizers(custom, [namespace]) == 0  # nothing left to release
    llmd("again", [naming.FINALIZER])
    assert shutdown.release_finalizers(custom) == 1  # every namespace, listed cluster-wide
