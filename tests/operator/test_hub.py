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
