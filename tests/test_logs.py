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
