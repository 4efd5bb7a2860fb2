import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _get_smollm2_script() -> Path | None:
    # shared/models sits beside the checkout (or inside it, on machines that carry it along).
    for base in (REPO, *REPO.parents):
        script = base / "shared" / "models" / "get-smollm2"
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
        pytest.skip("shared/models/get-smollm2 is not beside this checkout")
    fetched = subprocess.run([str(script), str(cache)], capture_output=True, text=True)
    if fetched.returncode != 0:
        pytest.skip(f"could not assemble SmolLM2 (offline?): {fetched.stderr.strip()[-400:]}")
    return cache / "smollm2-135m-instruct-q4_1"
