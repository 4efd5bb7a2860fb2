import json
import logging

from serving.logs import JsonFormatter


def test_json_formatter_keeps_extra_fields_and_exceptions():
    record = logging.LogRecord("fleetlm.api", logging.INFO, __file__, 1, "request %s done", ("r1",), None)
    record.request_id = "r1"
    record.completion_tokens = 7
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request r1 done"
    assert line["level"] == "info"
    assert line["request_id"] == "r1" and line["completion_tokens"] == 7

    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        err = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(err))["exc"]


def _stderr_records(code: str) -> list[dict]:
    """What `code`, run in a fresh Python, writes to stderr, each line parsed as JSON (any plain-text
    line fails the parse)."""
    import subprocess
    import sys

    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr.splitlines()
    return [json.loads(line) for line in lines]


def test_every_line_is_json_libraries_and_warnings_included():
    """huggingface_hub and transformers log through handlers of their own, and warnings.warn prints:
    a process that set up logging writes JSON lines only (a downloader's log is read line by line)."""
    code = (
        "import warnings, huggingface_hub, transformers\n"
        "from huggingface_hub.utils import logging as hub_logging\n"
        "from serving.logs import setup_logging\n"
        "hub_logging.get_logger('huggingface_hub.file_download')\n"
        "setup_logging('info')\n"
        "import logging\n"
        "logging.getLogger('huggingface_hub.file_download').warning('Error while downloading: trying to resume')\n"
        "transformers.logging.get_logger('transformers.x').warning('from transformers')\n"
        "warnings.warn('Not enough free disk space')\n"
    )
    records = _stderr_records(code)
    assert len(records) == 3
    assert any("Not enough free disk space" in r["msg"] for r in records)


def test_transformers_imported_after_logging_is_set_up_logs_json_too():
    """transformers sets up its own plain-text handler when first used, after setup_logging in the serving
    processes: "Token indices sequence length is longer ..." came out as plain text among the JSON."""
    code = (
        "from serving.logs import setup_logging\n"
        "setup_logging('info')\n"
        "from transformers import AutoTokenizer\n"
        "from serving.models.loader import load_tokenizer\n"
        "from serving.models.source import demo_model_dir\n"
        "AutoTokenizer.from_pretrained(demo_model_dir())('once ' * 3000)\n"
    )
    assert any("Token indices sequence length" in r["msg"] for r in _stderr_records(code))
