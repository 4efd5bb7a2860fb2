"""The model downloader against a fake Hub over real HTTP, with real huggingface_hub and real subprocesses."""

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

from serving.download import DownloadError, ExitCode, copy_model, download_model, model_dir, progress, room
from serving.download.hub import progress_bar_class
from serving.download.model_dir import MARKER_NAME
from serving.download.model_files import select_files
from serving.download.progress import Transfer
from tests.hub_server import FakeHub

CLI = "import sys; from serving.download import main; sys.exit(main(sys.argv[1:]))"
MB = 1024 * 1024


def model_files(weights_size: int = 300_000) -> dict[str, bytes]:
    """A repo as the Hub has them: what serving needs, plus files it must never fetch."""
    return {
        "config.json": b'{"model_type": "llama"}',
        "generation_config.json": b"{}",
        "tokenizer.json": b'{"model": {}}',
        "tokenizer_config.json": b"{}",
        "model.safetensors": os.urandom(weights_size),
        "pytorch_model.bin": os.urandom(1000),
        "README.md": b"# card",
        "onnx/model.onnx": b"onnx",
        "images/logo.png": b"png",
    }


NEEDED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def run_cli(*args: str, stderr_path: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    stderr = open(stderr_path, "w") if stderr_path else subprocess.PIPE  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args], stderr=stderr, text=True, env={**os.environ, **(env or {})}
    )


def cli(*args: str, env: dict | None = None) -> tuple[int, list[dict]]:
    process = run_cli(*args, env=env)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, [json.loads(line) for line in stderr.splitlines()]


def log_lines(path: Path) -> list[dict]:
    """The JSON lines a running (or killed) process has written so far, without a half-written last one."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def assert_holds(dest: Path, files: dict[str, bytes], expected: list[str]) -> dict:
    present = sorted(
        p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts
    )
    assert present == sorted([*expected, ".fleetlm-complete.json", ".fleetlm-download.lock"])
    for name in expected:
        assert (dest / name).read_bytes() == files[name], name
    return json.loads((dest / MARKER_NAME).read_text())


# --- which files are taken -----------------------------------------------------------------------------


def select(files, index=None, gguf_file=None):
    return select_files(files, lambda name: index, origin="org/x", gguf_file=gguf_file)


def test_selection_takes_config_tokenizer_and_safetensors_only():
    files = [
        *NEEDED,
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
        "pytorch_model.bin",
        "consolidated.pth",
        "model.gguf",
        "README.md",
        "onnx/model.onnx",
        "original/tokenizer.model",
    ]
    assert select(files) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "model.safetensors",
    ]


def test_selection_follows_the_weight_index_and_skips_a_consolidated_copy():
    files = [
        "config.json",
        "model.safetensors.index.json",
        "a.safetensors",
        "b.safetensors",
        "consolidated.safetensors",
    ]
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "a.safetensors"}}
    assert select(files, index) == [
        "config.json",
        "model.safetensors.index.json",
        "a.safetensors",
        "b.safetensors",
    ]

    with pytest.raises(DownloadError, match="missing shards: c.safetensors") as error:
        select(files, {"weight_map": {"x": "c.safetensors"}})
    assert error.value.exit_code == ExitCode.NOT_FOUND


def test_selection_falls_back_to_pytorch_weights_then_gguf():
    assert select(["config.json", "pytorch_model.bin", "training_args.bin"]) == [
        "config.json",
        "pytorch_model.bin",
    ]
    assert select(["consolidated.pth"]) == ["consolidated.pth"]
    assert select(["config.json", "q4/model-Q4_0.gguf"]) == ["config.json", "q4/model-Q4_0.gguf"]
    assert select(["a.gguf", "b.gguf", "model.safetensors"], gguf_file="b.gguf") == ["b.gguf"]


@pytest.mark.parametrize(
    ("files", "gguf_file", "exit_code", "message"),
    [
        (["a.gguf", "b.gguf"], None, ExitCode.USAGE, "2 GGUF files: pick one with --gguf-file"),
        (["a.gguf"], "c.gguf", ExitCode.NOT_FOUND, r"c.gguf not found in org/x \(GGUF files: a.gguf\)"),
        (["config.json", "README.md"], None, ExitCode.NOT_FOUND, "has no weights"),
    ],
)
def test_selection_errors(files, gguf_file, exit_code, message):
    with pytest.raises(DownloadError, match=message) as error:
        select(files, gguf_file=gguf_file)
    assert error.value.exit_code == exit_code


# --- downloads through the fake Hub ------------------------------------------------------------------


def test_downloads_only_what_serving_needs_byte_exact_with_a_marker(fake_hub, tmp_path):
    files = model_files()
    commit = fake_hub.add_repo("org/tiny", files, refs=("main", "v1"), token="secret", gated=True)

    assert download_model("org/tiny", "v1", tmp_path / "m", token="secret") == tmp_path / "m"

    marker = assert_holds(tmp_path / "m", files, NEEDED)
    assert marker["repo"] == "org/tiny" and marker["revision"] == "v1" and marker["commit"] == commit
    assert marker["files"] == [{"path": name, "size": len(files[name])} for name in NEEDED]
    assert marker["completed_at"].endswith("+00:00")
    assert not fake_hub.gets("README.md") and not fake_hub.gets("pytorch_model.bin")
    # The weights came from the CDN, like the Hub's LFS files, without the token; the Hub got the token.
    (weights,) = fake_hub.gets("model.safetensors")
    assert weights.server == "cdn" and weights.authorization is None
    assert {r.authorization for r in fake_hub.requests if r.server == "hub"} == {"Bearer secret"}


def test_a_complete_destination_is_reused_without_network(fake_hub, tmp_path):
    files = model_files()
    first = fake_hub.add_repo("org/tiny", files)
    download_model("org/tiny", None, tmp_path)
    seen = len(fake_hub.requests)

    fake_hub.add_repo("org/tiny", {**files, "config.json": b'{"model_type": "qwen2"}'})  # main moves on
    download_model("org/tiny", "main", tmp_path)
    download_model("org/tiny", first, tmp_path)
    assert len(fake_hub.requests) == seen
    assert (tmp_path / "config.json").read_bytes() == files["config.json"]

    with pytest.raises(DownloadError, match="revision v9 not found"):
        download_model("org/tiny", "v9", tmp_path)
    assert json.loads((tmp_path / MARKER_NAME).read_text())["commit"] == first  # a failed lookup keeps it


def test_another_revision_replaces_the_previous_download(fake_hub, tmp_path):
    old = {**model_files(), "model.safetensors": os.urandom(1000), "tokenizer.model": b"sp"}
    fake_hub.add_repo("org/tiny", old, refs=("v1",))
    new = {
        "config.json": b'{"model_type": "qwen2"}',
        "tokenizer.json": old["tokenizer.json"],
        "model.safetensors.index.json": b'{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}',
        "model-1.safetensors": os.urandom(2000),
        "model-2.safetensors": os.urandom(3000),
        "consolidated.safetensors": os.urandom(5000),
    }
    commit = fake_hub.add_repo("org/tiny", new, refs=("v2",))
    download_model("org/tiny", "v1", tmp_path)

    download_model("org/tiny", "v2", tmp_path)

    wanted = [
        "config.json",
        "model-1.safetensors",
        "model-2.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    assert assert_holds(tmp_path, new, wanted)["commit"] == commit  # old weights and tokenizer.model removed
    assert not fake_hub.gets("consolidated.safetensors")
    assert len(fake_hub.gets("tokenizer.json")) == 1  # unchanged across revisions: kept, not fetched again


def test_gguf_repo_takes_the_chosen_file(fake_hub, tmp_path):
    files = {"config.json": b"{}", "m-Q4_0.gguf": os.urandom(500), "m-Q8_0.gguf": os.urandom(900)}
    fake_hub.add_repo("org/gguf", files)
    download_model("org/gguf", None, tmp_path, gguf_file="m-Q8_0.gguf")
    assert_holds(tmp_path, files, ["config.json", "m-Q8_0.gguf"])
    download_model("org/gguf", None, tmp_path, gguf_file="m-Q4_0.gguf")  # another choice is another download
    assert_holds(tmp_path, files, ["config.json", "m-Q4_0.gguf"])


def test_a_mistral_repos_consolidated_copy_beside_its_weights_is_skipped():
    """Mistral's repos hold model.safetensors and consolidated.safetensors, no index: one copy is enough."""
    files = ["config.json", "consolidated.safetensors", "model.safetensors", "tokenizer.json"]
    assert select(files, None) == ["config.json", "tokenizer.json", "model.safetensors"]
    assert select(["config.json", "consolidated.safetensors"], None) == ["config.json", "consolidated.safetensors"]


def test_an_empty_hf_token_is_no_token(fake_hub, tmp_path):
    """An empty Secret value (HF_TOKEN=): a public repo downloads (it was sent as "Bearer ", a network error)."""
    fake_hub.add_repo("org/tiny", model_files())
    code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path), "--retries", "0", env={"HF_TOKEN": ""})
    assert code == 0, lines[-1]


def test_progress_is_logged_per_file_and_periodically(fake_hub, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 100_000)
    fake_hub.add_repo("org/tiny", model_files(weights_size=1_000_000))
    caplog.set_level("INFO", logger="fleetlm.download")

    download_model("org/tiny", None, tmp_path)

    weights = [r for r in caplog.records if getattr(r, "file", None) == "model.safetensors"]
    assert [r.msg for r in weights[:2]] == ["file started", "file progress"] and weights[
        -1
    ].msg == "file finished"
    steps = [r.downloaded_bytes for r in weights if r.msg == "file progress"]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] == 1_000_000
    assert weights[-1].bytes == 1_000_000 and weights[-1].downloaded_bytes == 1_000_000


def test_the_whole_models_progress_is_logged_with_an_eta(fake_hub, tmp_path, monkeypatch, caplog):
    """One "download progress" line over every file (the operator reads the latest for status.startup)."""
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 100_000)
    files = model_files(weights_size=600_000)
    fake_hub.add_repo("org/tiny", files)
    caplog.set_level("INFO", logger="fleetlm.download")
    download_model("org/tiny", None, tmp_path)
    wanted = sum(len(files[name]) for name in ("config.json", "generation_config.json", "tokenizer.json",
                                                 "tokenizer_config.json", "model.safetensors"))  # fmt: skip
    (plan,) = [r for r in caplog.records if r.msg == "download planned"]
    assert plan.total_bytes == wanted and plan.files == 5
    lines = [r for r in caplog.records if r.msg == "download progress"]
    assert lines and all(r.total_bytes == wanted for r in lines)
    done = [r.downloaded_bytes for r in lines]
    assert done == sorted(done) and done[-1] == wanted and lines[-1].percent == 100.0
    assert lines[-1].eta_s == 0 and all(r.eta_s is None or r.eta_s >= 0 for r in lines)


def test_progress_bar_fits_huggingface_hubs_xet_reporter():
    """The real Hub serves weights through xet, which the fake Hub cannot: check the bar against xet's reporter."""
    transfer = Transfer("model.safetensors", 1000)
    bar_class = progress_bar_class(transfer)
    with XetDownloadProgressReporter(
        reconstruction_desc="x", total=1000, log_level=20, tqdm_class=bar_class
    ) as reporter:
        for done in (400, 1000):
            report = SimpleNamespace(
                total_bytes_completed=done,
                total_transfer_bytes_completed=done // 2,
                total_bytes_completion_rate=1e6,
                total_transfer_bytes_completion_rate=1e6,
                total_bytes=1000,
            )
            reporter.update_progress(report)
    assert transfer.received == 1000


def test_a_dropped_connection_resumes_with_a_range_request(fake_hub, tmp_path):
    files = model_files(weights_size=12 * MB)
    fake_hub.add_repo("org/big", files)
    fake_hub.drop_connection("model.safetensors", after_bytes=11 * MB)

    download_model("org/big", None, tmp_path)

    assert_holds(tmp_path, files, NEEDED)
    first, resumed = fake_hub.gets("model.safetensors")
    # huggingface_hub writes in 10 MiB chunks, so the resume starts at the last whole chunk it had.
    assert first.range is None and resumed.range == f"bytes={10 * MB}-"


def test_a_killed_download_is_completed_by_the_next_run(fake_hub, tmp_path):
    files = model_files(weights_size=3 * MB)
    fake_hub.add_repo("org/big", files)
    stall = fake_hub.stall("model.safetensors", after_bytes=MB)
    log = tmp_path / "first.log"
    dest = tmp_path / "m"
    first = run_cli("--model", "org/big", "--dest", str(dest), stderr_path=log)
    wait_until(lambda: stall.reached.is_set())
    wait_until(lambda: sum(line["msg"] == "file finished" for line in log_lines(log)) == len(NEEDED) - 1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert not (dest / MARKER_NAME).exists() and not (dest / "model.safetensors").exists()
    assert list((dest / ".cache").rglob("*.incomplete")), "the killed run left its partial file"

    code, _ = cli("--model", "org/big", "--dest", str(dest))

    assert code == 0
    assert_holds(dest, files, NEEDED)
    assert not list((dest / ".cache").rglob("*.incomplete"))
    assert len(fake_hub.gets("model.safetensors")) == 2
    assert all(len(fake_hub.gets(name)) == 1 for name in NEEDED if name != "model.safetensors")


def _pid_1_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.parametrize("as_pid_1", [False, True])
def test_sigterm_stops_a_download_at_once_even_as_pid_1(fake_hub, tmp_path, as_pid_1):
    """A pod deleted mid-download: the init container's process, PID 1 of its PID namespace (whose
    signals without a handler the kernel drops), stops on SIGTERM rather than after the grace period,
    and the next run completes the model."""
    if as_pid_1 and not _pid_1_works():
        pytest.skip("no PID namespaces here (unshare --pid)")
    files = model_files(weights_size=3 * MB)
    fake_hub.add_repo("org/big", files)
    stall = fake_hub.stall("model.safetensors", after_bytes=MB)
    dest, log = tmp_path / "m", tmp_path / "first.log"
    wrap = ["unshare", "--pid", "--fork", "--kill-child"] if as_pid_1 else []
    with open(log, "w") as stderr:
        outer = subprocess.Popen([*wrap, sys.executable, "-c", CLI, "--model", "org/big", "--dest", str(dest)], stderr=stderr)
    wait_until(lambda: stall.reached.is_set())
    if as_pid_1:  # the Python process is unshare's child, PID 1 inside; signal it from outside, as the kubelet's runtime does
        (child,) = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGTERM)
    else:
        outer.send_signal(signal.SIGTERM)
    assert outer.wait(timeout=10) == 128 + signal.SIGTERM
    assert log_lines(log)[-1]["msg"] == "download stopped by SIGTERM"
    assert not (dest / MARKER_NAME).exists()
    stall.release()

    code, _ = cli("--model", "org/big", "--dest", str(dest))

    assert code == 0
    assert_holds(dest, files, NEEDED)


def test_two_downloaders_into_one_directory_take_turns(fake_hub, tmp_path):
    files = model_files(weights_size=2 * MB)
    fake_hub.add_repo("org/tiny", files)
    stall = fake_hub.stall("model.safetensors", after_bytes=MB)
    dest = tmp_path / "m"
    first = run_cli("--model", "org/tiny", "--dest", str(dest), stderr_path=tmp_path / "first.log")
    wait_until(lambda: stall.reached.is_set())
    second = run_cli("--model", "org/tiny", "--dest", str(dest), stderr_path=tmp_path / "second.log")
    wait_until(lambda: any("waiting for it" in line["msg"] for line in log_lines(tmp_path / "second.log")))

    stall.release()

    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    assert_holds(dest, files, NEEDED)
    assert [line["msg"] for line in log_lines(tmp_path / "second.log")][-1] == "already complete"
    assert len([r for r in fake_hub.requests if r.path.startswith("/api/models/")]) == 1
    assert all(len(fake_hub.gets(name)) == 1 for name in NEEDED)


# --- room on a cache volume: other models evicted, least recently used first -----------------------


def _volume(monkeypatch, root: Path, capacity: int) -> None:
    """Make the filesystem under `root` a volume of `capacity` bytes: its free space is what the files
    under it leave (shutil.disk_usage is what the downloader, and huggingface_hub, measure)."""
    real = shutil.disk_usage

    def disk_usage(path):
        if root not in Path(path).resolve().parents and Path(path).resolve() != root:
            return real(path)
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return shutil._ntuple_diskusage(capacity, used, max(capacity - used, 0))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _cache_of_two(fake_hub, tmp_path, size: int) -> tuple[Path, Path, Path, dict]:
    """A cache root holding org/a at v1 and org/b, org/b the least recently used."""
    root = (tmp_path / "hf").resolve()
    a1, b = root / "org--a" / "v1", root / "org--b" / "main"
    fake_hub.add_repo("org/a", model_files(size), refs=("v1",))
    fake_hub.add_repo("org/b", model_files(size))
    download_model("org/a", "v1", a1, cache_root=root)
    download_model("org/b", None, b, cache_root=root)
    hour_ago = time.time() - 3600  # both last used then (timestamps of one clock tick would tie)
    for model in (a1, b):
        os.utime(model / model_dir.LOCK_NAME, (hour_ago, hour_ago))
    download_model("org/a", "v1", a1, cache_root=root)  # a pod starts on org/a again: now b is the older
    new = model_files(size)
    fake_hub.add_repo("org/a", new, refs=("v2",))
    return root, a1, b, new


def test_a_cache_without_room_evicts_the_least_recently_used_other_model(fake_hub, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="fleetlm.download")
    root, a1, b, new = _cache_of_two(fake_hub, tmp_path, 400_000)
    # Room for half of the new revision: evicting one model (b, the least recently used) is enough.
    _volume(monkeypatch, root, _dir_bytes(root) + room.HEADROOM + 200_000)
    a2 = root / "org--a" / "v2"

    download_model("org/a", "v2", a2, cache_root=root)

    assert_holds(a2, new, NEEDED)
    assert not (root / "org--b").exists()  # the model and its repo's directory
    assert (a1 / MARKER_NAME).exists() and download_model("org/a", "v1", a1) == a1  # still whole
    (evicted,) = [r for r in caplog.records if r.msg == "evicted a model from the cache to make room"]
    assert (evicted.dir, evicted.repo, evicted.complete) == (str(b), "org/b", True)


def test_a_cache_with_room_keeps_every_model(fake_hub, tmp_path, monkeypatch):
    root, a1, b, new = _cache_of_two(fake_hub, tmp_path, 400_000)
    _volume(monkeypatch, root, _dir_bytes(root) + room.HEADROOM + 2_000_000)

    code, lines = cli("--model", "org/a", "--revision", "v2", "--dest", str(root / "org--a" / "v2"), "--cache-root", str(root))

    assert code == 0, lines
    assert (a1 / MARKER_NAME).exists() and (b / MARKER_NAME).exists()


def test_a_model_being_downloaded_is_never_evicted(fake_hub, tmp_path, monkeypatch, caplog):
    root, a1, b, new = _cache_of_two(fake_hub, tmp_path, 400_000)
    _volume(monkeypatch, root, _dir_bytes(root) + room.HEADROOM + 200_000)
    with model_dir.exclusive(b):  # a download into org/b is running (another pod's)
        download_model("org/a", "v2", root / "org--a" / "v2", cache_root=root)
        assert (b / MARKER_NAME).exists()
    assert not a1.exists()  # the next least recently used went instead

    # With nothing left to evict, the download goes on and says what is missing.
    fake_hub.add_repo("org/a", model_files(400_000), refs=("v3",))
    with model_dir.exclusive(b), model_dir.exclusive(root / "org--a" / "v2"):
        download_model("org/a", "v3", root / "org--a" / "v3", cache_root=root)
    assert (b / MARKER_NAME).exists() and (root / "org--a" / "v2" / MARKER_NAME).exists()
    assert "this download needs" in caplog.text


def test_a_downloader_waiting_on_an_evicted_directory_makes_it_anew(tmp_path, caplog):
    caplog.set_level("INFO", logger="fleetlm.download")
    dest = tmp_path / "m"
    dest.mkdir()
    evicting = os.open(dest / model_dir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(evicting, fcntl.LOCK_EX)  # as model_dir.remove holds it while it deletes
    done = threading.Event()

    def download() -> None:
        with model_dir.exclusive(dest):
            (dest / "weights").write_bytes(b"new")
        done.set()

    thread = threading.Thread(target=download)
    thread.start()
    wait_until(lambda: "waiting for it" in caplog.text)
    (dest / model_dir.LOCK_NAME).unlink()
    dest.rmdir()
    os.close(evicting)
    thread.join(timeout=10)

    assert done.is_set() and (dest / "weights").read_bytes() == b"new" and (dest / model_dir.LOCK_NAME).exists()


# --- failures: exit codes and messages, through the real CLI ----------------------------------------


@pytest.mark.parametrize(
    ("repo", "revision", "token", "exit_code", "message"),
    [
        ("org/gated", "main", None, 3, "repo org/gated is gated and needs a token: set HF_TOKEN"),
        ("org/gated", "main", "wrong-token", 3, "repo org/gated is gated and this token has no access"),
        ("org/private", "main", None, 3, "repo org/private needs a token: set HF_TOKEN"),
        ("org/missing", "main", "wrong-token", 4, "repo org/missing not found"),
        ("org/gated", "v9", "hf_right", 4, "revision v9 not found in org/gated"),
    ],
)
def test_hub_errors_exit_with_their_code_and_message(
    fake_hub, tmp_path, repo, revision, token, exit_code, message
):
    fake_hub.add_repo("org/gated", model_files(), token="hf_right", gated=True)
    fake_hub.add_repo("org/private", model_files(), token="hf_right")
    env = {"HF_TOKEN": token} if token else {}

    code, lines = cli("--model", repo, "--revision", revision, "--dest", str(tmp_path), env=env)

    assert code == exit_code
    assert lines[-1]["level"] == "error" and lines[-1]["msg"].startswith(message)
    assert not (tmp_path / MARKER_NAME).exists()
    if token:
        assert all(token not in json.dumps(line) for line in lines)


def test_the_token_comes_from_hf_token_and_is_never_logged(fake_hub, tmp_path):
    fake_hub.add_repo("org/gated", model_files(), token="hf_right", gated=True)
    code, lines = cli(
        "--model", "org/gated", "--dest", str(tmp_path), "--log-level", "debug", env={"HF_TOKEN": "hf_right"}
    )
    assert code == 0
    assert lines and all("hf_right" not in json.dumps(line) for line in lines)


def test_an_unreachable_hub_exits_5_after_retries(tmp_path, monkeypatch, caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("serving.download.RETRY_BASE_DELAY_S", 0.01)

    with pytest.raises(DownloadError, match=f"cannot reach the Hub at http://127.0.0.1:{port}") as error:
        download_model("org/tiny", None, tmp_path, retries=2)
    assert error.value.exit_code == ExitCode.NETWORK
    assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 2

    code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path), "--retries", "0")
    assert code == 5 and lines[-1]["msg"].startswith("cannot reach the Hub")


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "org/x"],  # no --dest
        ["--model", "org/x", "--source", "/tmp", "--dest"],
        ["--source", "/tmp", "--revision", "v1", "--dest"],
        ["--model", "org/x", "--retries", "many", "--dest"],
        ["--model", "org/x", "--retries", "-1", "--dest"],  # it retried forever
        ["--model", "org/x/y", "--dest"],  # not a repo id
    ],
)
def test_bad_usage_exits_2_and_touches_nothing(tmp_path, args):
    process = run_cli(*args, *([str(tmp_path / "m")] if args[-1] == "--dest" else []))
    process.communicate(timeout=60)
    assert process.returncode == 2
    assert not (tmp_path / "m").exists()


def test_several_gguf_files_without_a_choice_exit_2(fake_hub, tmp_path):
    fake_hub.add_repo("org/gguf", {"a.gguf": b"a", "b.gguf": b"b"})
    code, lines = cli("--model", "org/gguf", "--dest", str(tmp_path))
    assert code == 2 and "pick one with --gguf-file (a.gguf, b.gguf)" in lines[-1]["msg"]


def test_an_unwritable_destination_exits_6(fake_hub, tmp_path):
    fake_hub.add_repo("org/tiny", model_files())
    (tmp_path / "file").write_text("not a directory")
    code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path / "file" / "m"))
    assert code == 6 and lines[-1]["msg"].startswith("I/O error on")


# --- copying from a local directory or PVC ----------------------------------------------------------


def test_copy_from_a_local_source_selects_marks_and_skips_when_complete(tmp_path, caplog):
    files = model_files()
    source = tmp_path / "pvc"
    for name, content in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    dest = tmp_path / "m"

    code, _ = cli("--source", str(source), "--dest", str(dest))

    assert code == 0
    marker = assert_holds(dest, files, NEEDED)
    assert marker["source"] == str(source) and marker["repo"] is None
    caplog.set_level("INFO", logger="fleetlm.download")
    copy_model(source, dest)
    assert caplog.records[-1].msg == "already complete"

    files["config.json"] = b'{"model_type": "qwen2"}'
    (source / "config.json").write_bytes(files["config.json"])
    copy_model(source, dest)
    assert_holds(dest, files, NEEDED)

    code, lines = cli("--source", str(tmp_path / "missing"), "--dest", str(dest))
    assert code == 4 and lines[-1]["msg"] == f"source directory {tmp_path / 'missing'} not found"


def _mirror_ca(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA and a certificate for 127.0.0.1 signed by it: a mirror behind a company CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mirror Test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    bundle, chain, private = tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"
    bundle.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, private)
    return bundle, context


def test_a_mirror_behind_its_own_ca_works_with_the_env_the_operator_sets(tmp_path):
    """The operator's pods get HF_ENDPOINT and, for a caBundle, FLEETLM_EXTRA_CA_FILE
    (llm_operator.deployment._hub_access): with it the downloader fetches over TLS from a mirror whose
    certificate no public CA signed; without the bundle it refuses the mirror (exit 5, a network error)."""
    bundle, context = _mirror_ca(tmp_path)
    with FakeHub(tls=context) as mirror:
        mirror.add_repo("org/tiny", model_files(20_000))
        env = {"HF_ENDPOINT": mirror.url}
        code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path / "untrusted"), "--retries", "0", env=env)
        assert code == 5, lines[-1]
        trusted = {**env, "FLEETLM_EXTRA_CA_FILE": str(bundle)}
        code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path / "model"), env=trusted)
        assert code == 0, lines[-1]
    assert (tmp_path / "model" / "config.json").read_bytes() == b'{"model_type": "llama"}'


def test_offline_mode_on_an_incomplete_destination_says_so(fake_hub, tmp_path):
    """HF_HUB_OFFLINE=1 with nothing downloaded yet: one line naming the variable (a traceback, exit 1)."""
    fake_hub.add_repo("org/tiny", model_files())
    code, lines = cli("--model", "org/tiny", "--dest", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert code == 2 and lines[-1]["msg"].startswith("HF_HUB_OFFLINE is set"), lines[-3:]


def test_a_file_that_arrives_short_is_fetched_again(fake_hub, tmp_path, monkeypatch):
    """The CDN sends half the file at a matching length: huggingface_hub's size check fails with an
    OSError of its own, which ended the download at once with exit 1; it is a network error, retried."""
    monkeypatch.setattr("serving.download.RETRY_BASE_DELAY_S", 0.01)
    files = model_files(weights_size=MB)
    fake_hub.add_repo("org/tiny", files)
    fake_hub.answer_instead("cdn", hashlib.sha256(files["model.safetensors"]).hexdigest(), truncate=MB // 2)
    download_model("org/tiny", None, tmp_path, retries=1)
    assert_holds(tmp_path, files, NEEDED)


@pytest.mark.parametrize(
    ("server", "path_part", "status", "body", "message", "exit_code"),
    [
        # A proxy's login page where the Hub's API answers JSON: a traceback and exit 1 before.
        ("hub", "api/models/", 200, b"<html>sign in</html>", "did not answer like the Hub's API", ExitCode.NETWORK),
        # The CDN the Hub redirects to refuses: no token goes there, so "check HF_TOKEN" (exit 3) misled.
        ("cdn", "", 403, b"", "where the Hub sent the download of model.safetensors, refused it (HTTP 403)", ExitCode.NETWORK),
    ],
)
def test_answers_from_elsewhere_than_the_hub_are_named_as_such(fake_hub, tmp_path, monkeypatch, server, path_part, status, body, message, exit_code):
    monkeypatch.setattr("serving.download.RETRY_BASE_DELAY_S", 0.01)
    files = model_files(weights_size=MB)
    fake_hub.add_repo("org/tiny", files)
    fake_hub.answer_instead(server, path_part, status, body, times=99)
    with pytest.raises(DownloadError, match=re.escape(message)) as error:
        download_model("org/tiny", None, tmp_path, retries=1)
    assert error.value.exit_code == exit_code


def test_a_restarted_downloads_progress_counts_the_files_it_keeps(fake_hub, tmp_path, monkeypatch, caplog):
    """A run that finds some files complete from a killed one keeps them (no bytes move), and they count
    toward the model's progress all the same: its last line said 25% where the download was done."""
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)
    files = model_files(weights_size=600_000)
    fake_hub.add_repo("org/tiny", files)
    download_model("org/tiny", None, tmp_path)
    (tmp_path / MARKER_NAME).unlink()  # as if killed before the marker: a restart checks every file
    (tmp_path / "tokenizer.json").unlink()
    caplog.set_level("INFO", logger="fleetlm.download")
    download_model("org/tiny", None, tmp_path)
    assert [r.file for r in caplog.records if r.msg == "file started"].count("model.safetensors") == 1
    assert len(fake_hub.gets("model.safetensors")) == 1  # kept, not fetched again
    last = [r for r in caplog.records if r.msg == "download progress"][-1]
    assert last.downloaded_bytes == last.total_bytes and last.percent == 100.0


def test_a_mirrors_ca_is_trusted_beside_the_public_roots(tmp_path, monkeypatch):
    """The mirror's CA alone was SSL_CERT_FILE: a mirror that redirects its files to a store with a public
    certificate failed there. The bundle trusted holds the public roots and the mirror's CA."""
    import certifi

    from serving.trust import trust_extra_ca

    bundle, _ = _mirror_ca(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    environ = {"FLEETLM_EXTRA_CA_FILE": str(bundle)}
    written = trust_extra_ca(environ)
    assert environ["SSL_CERT_FILE"] == environ["REQUESTS_CA_BUNDLE"] == str(written)
    text = written.read_text()
    assert Path(certifi.where()).read_text().strip() in text and bundle.read_text().strip() in text
    ssl.create_default_context(cafile=str(written))  # a bundle ssl reads
    assert trust_extra_ca({}) is None
    (tmp_path / "not.pem").write_text("hello")
    for bad in (tmp_path / "not.pem", tmp_path / "missing.pem"):
        with pytest.raises(ValueError, match="FLEETLM_EXTRA_CA_FILE"):
            trust_extra_ca({"FLEETLM_EXTRA_CA_FILE": str(bad)})


def test_a_429_is_retried_after_the_wait_the_hub_asks_for(fake_hub, tmp_path, monkeypatch, caplog):
    """Rate-limited: the Retry-After's seconds are waited (the backoff alone ran out in 14 s, exit 5)."""
    monkeypatch.setattr("serving.download.RETRY_BASE_DELAY_S", 0.01)
    files = model_files()
    fake_hub.add_repo("org/tiny", files)
    fake_hub.answer_instead("hub", "api/models/", 429, headers={"Retry-After": "0.25"})
    caplog.set_level("INFO", logger="fleetlm.download")
    download_model("org/tiny", None, tmp_path, retries=1)
    assert_holds(tmp_path, files, NEEDED)
    assert [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()] == [
        "the Hub answered HTTP 429 for org/tiny; retrying in 0.25s"
    ]
