"""The operator's Hub client against answers a mirror may garble: each is a HubError (a status condition
on the resource), never another exception that would leave the resource with no status at all."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from llm_operator.hub import Hub, HubError

SHA = "a" * 40


def opener(answers: dict[str, Any]):
    """urlopen's stand-in: the JSON (or raw bytes) answered for each URL suffix."""

    def urlopen(request, timeout=None, context=None):
        for suffix, answer in answers.items():
            if request.full_url.split("?")[0].endswith(suffix):
                return io.BytesIO(answer if isinstance(answer, bytes) else json.dumps(answer).encode())
        raise AssertionError(f"unexpected {request.full_url}")

    return urlopen


@pytest.mark.parametrize("info", [
    ["not", "an", "object"],
    {"sha": 7},
    {"siblings": []},
    b"<html>a captive portal</html>",
])  # fmt: skip
def test_an_answer_without_a_commit_is_a_hub_error(info) -> None:
    with pytest.raises(HubError, match="names no commit|Expecting value"):
        Hub(opener({"/revision/main": info})).resolve("org/m", "main", "http://mirror")


def test_garbled_file_entries_are_skipped_and_sizes_read_where_present() -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}
    info = {"sha": SHA, "siblings": [
        "model.safetensors",  # not an object
        {"size": 5},  # no file name
        {"rfilename": "config.json"},
        {"rfilename": "a.safetensors", "size": "big"},
        {"rfilename": "b.safetensors", "lfs": {"size": 100}},
        {"rfilename": "c.safetensors", "size": 20, "lfs": "x"},
    ]}  # fmt: skip
    found = Hub(opener({"/revision/main": info, "/config.json": config})).resolve("org/m", "main", "http://mirror")
    assert found.commit == SHA
    assert found.facts is not None and found.facts.weight_bytes == 120 and found.facts.config == config


def test_siblings_that_are_not_a_list_mean_no_facts() -> None:
    found = Hub(opener({"/revision/main": {"sha": SHA, "siblings": {"rfilename": "config.json"}}})).resolve(
        "org/m", "main", None
    )
    assert (found.commit, found.facts) == (SHA, None)


@pytest.mark.parametrize(
    ("files", "gguf_file", "expected"),
    [
        # Mistral's layout: Hugging Face's shards and the same weights again as consolidated.safetensors
        ({"model-00001-of-00002.safetensors": 9, "model-00002-of-00002.safetensors": 5, "consolidated.safetensors": 14}, None, 14),
        ({"consolidated.safetensors": 14}, None, 14),  # the only copy there is
        ({"pytorch_model.bin": 30, "training_args.bin": 1}, None, 30),  # trainer state is not fetched
        ({"model.safetensors": 7, "pytorch_model.bin": 30}, None, 7),
        ({"m-BF16.gguf": 160, "m-Q4_K_M.gguf": 49}, "m-BF16.gguf", 160),  # hf.ggufFile's choice
        ({"m-BF16.gguf": 160, "Q4/m-Q4_K_M.gguf": 49}, "Q4/m-Q4_K_M.gguf", 49),
        ({"m-BF16.gguf": 160, "m-Q4_K_M.gguf": 49}, None, 49),  # unchosen (the downloader refuses): not over-counted
    ],
)
def test_weight_bytes_count_what_the_downloader_fetches(files, gguf_file, expected) -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}
    info = {"sha": SHA, "siblings": [{"rfilename": "config.json"}, *({"rfilename": n, "size": b} for n, b in files.items())]}
    found = Hub(opener({"/revision/main": info, "/config.json": config})).resolve("org/m", "main", None)
    assert found.facts is not None and found.facts.choosing(gguf_file).weight_bytes == expected
