import os
import subprocess
from pathlib import Path

import pytest

from tests.hub_server import FakeHub
from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    """The demo model with a test chat template, one server per test module (a module that needs other
    settings defines its own `server`)."""
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE, max_batch_size=16) as s:
        yield s


@pytest.fixture
def client(server):
    """The official openai SDK on the module's server (no retries: an error must show as one)."""
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path_factory):
    """A running fake Hugging Face Hub; HF_ENDPOINT points at it, for this process and its subprocesses.

    huggingface_hub reads HF_ENDPOINT at import, so in-process code must read it at call time (as
    `serving.download` does); HF_HOME and HF_TOKEN are isolated so no real token or cache is used.
    """
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def _get_smollm2_script() -> Path | None:
    # shared/models sits beside the checkout (or inside it, on machines that carry it along);
    # FLEETLM_SHARED_MODELS points elsewhere, e.g. for a fresh clone under /tmp.
    candidates = [Path(os.environ["FLEETLM_SHARED_MODELS"])] if "FLEETLM_SHARED_MODELS" in os.environ else []
    candidates += [base / "shared" / "models" for base in (REPO, *REPO.parents)]
    for models in candidates:
        script = models / "get-smollm2"
        if script.is_file():
            return script
    return None


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct directory (GGUF Q4_1), assembled once into a cache outside
    the repository: $FLEETLM_TEST_CACHE, by default ~/.cache/fleetlm-tests."""
    cache = Path(os.environ.get("FLEETLM_TEST_CACHE", Path.home() / ".cache" / "fleetlm-tests"))
    script = _get_smollm2_script()
    if script is None:
        pytest.skip("shared/models/get-smollm2 is not beside this checkout (set FLEETLM_SHARED_MODELS)")
    fetched = subprocess.run([str(script), str(cache)], capture_output=True, text=True)
    if fetched.returncode != 0:
        pytest.skip(f"could not assemble SmolLM2 (offline?): {fetched.stderr.strip()[-400:]}")
    return cache / "smollm2-135m-instruct-q4_1"
