"""`--model-path org/name` serves a model fetched through the real Hub code path (a fake Hub over
HTTP), and `python -m serving download` is the init container's entry point."""

from __future__ import annotations

import subprocess
import sys

import openai

from tests.server_util import RunningServer
from tests.tiny_models import make_tiny_model


def _repo_files(model_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def test_serving_a_hub_id_downloads_the_revision_then_serves_it(fake_hub, tmp_path):
    files = _repo_files(make_tiny_model(tmp_path / "src", "llama"))
    fake_hub.add_repo("acme/tiny-llama", {**files, "README.md": b"# tiny", "pytorch_model.bin": b"unused"}, refs=("v1",))
    cache = tmp_path / "cache"
    with RunningServer(model_path="acme/tiny-llama", revision="v1", download_dir=str(cache)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "acme/tiny-llama"
        out = client.completions.create(model="acme/tiny-llama", prompt="Once upon", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
    fetched = {p.name for p in (cache / "acme--tiny-llama" / "v1").iterdir()}
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert "README.md" not in fetched and "pytorch_model.bin" not in fetched


def test_python_m_serving_download_is_the_init_container_command(fake_hub, tmp_path):
    fake_hub.add_repo("acme/tiny", _repo_files(make_tiny_model(tmp_path / "src", "qwen2")))
    dest = tmp_path / "models" / "acme-tiny"
    cmd = [sys.executable, "-m", "serving", "download", "--model", "acme/tiny", "--revision", "main", "--dest", str(dest)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (dest / ".fleetlm-complete.json").is_file()
    # The Hub answers an unknown repo with 401 unless a token is sent (exit 3); an unknown revision is 404.
    missing = subprocess.run([*cmd[:7], "v9", *cmd[8:]], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 4
    assert "revision v9 not found" in missing.stderr


def test_a_gguf_file_in_a_subfolder_is_served_with_the_directorys_config(fake_hub, tmp_path):
    """Repos that keep one quantization per subfolder (Q8_0/m-Q8_0.gguf): --gguf-file names the file in
    the directory or the repo, and the config and tokenizer still come from the top. The file was
    fetched, then looked for at the top only (no GGUF found), or beside its own subfolder's nothing."""
    from serving.config import ServeConfig
    from serving.models.source import resolve_source

    local = tmp_path / "local"
    for name in ("config.json", "tokenizer.json", "Q4_0/m-Q4_0.gguf", "Q8_0/m-Q8_0.gguf"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(b"{}")
    source = resolve_source(ServeConfig(model_path=str(local), gguf_file="Q8_0/m-Q8_0.gguf"))
    assert (source.directory, source.gguf_file) == (local, local / "Q8_0" / "m-Q8_0.gguf")

    fake_hub.add_repo("org/m-GGUF", {"config.json": b"{}", "Q4_0/m-Q4_0.gguf": b"q4", "Q8_0/m-Q8_0.gguf": b"q8"})
    cache = tmp_path / "cache"
    for choice in ("Q8_0/m-Q8_0.gguf", "Q4_0/m-Q4_0.gguf"):  # each its own directory: neither deletes the other
        source = resolve_source(ServeConfig(model_path="org/m-GGUF", gguf_file=choice, download_dir=str(cache)))
        assert source.gguf_file == source.directory / choice and source.gguf_file.read_bytes() == choice[:2].lower().encode()
        assert (source.directory / "config.json").is_file()
    assert len({p.parent for p in cache.rglob("*.gguf") if p.is_file()}) == 2
