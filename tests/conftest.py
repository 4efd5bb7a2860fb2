import pytest

from tests.hub_server import FakeHub


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
