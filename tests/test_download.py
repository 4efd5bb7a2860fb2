"""The model downloader against a fake Hub over real HTTP, with real huggingface_hub and real subprocesses."""

import pytest

from serving.download_errors import DownloadError, ExitCode
from serving.model_files import select_files

NEEDED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


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
