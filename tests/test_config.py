import subprocess
import sys

import pytest

from serving.config import ConfigError, ServeConfig, build_parser, load_config


def test_flags_beat_env_beat_file_beat_defaults(tmp_path):
    cfg_file = tmp_path / "fleetlm.toml"
    cfg_file.write_text('port = 7000\nmax-batch-size = 4\nqueue_capacity = 9\nlog_level = "debug"\n')
    env = {"LLM_PORT": "7100", "LLM_MAX_BATCH_SIZE": "5", "LLM_CONFIG": str(cfg_file)}
    cfg = load_config(["--port", "7200"], env)
    assert cfg.port == 7200  # flag
    assert cfg.max_batch_size == 5  # env over file
    assert cfg.queue_capacity == 9  # file over default
    assert cfg.log_level == "debug"
    assert cfg.max_seq_len == 2048  # default


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--quantization", "q3_k"], {}, "--quantization"),
        (["--device", "tpu"], {}, "--device"),
        ([], {"LLM_PORT": "http"}, "--port"),
        (["--max-batch-size", "0"], {}, "--max-batch-size"),
        (["--model-arch", "bert"], {}, "--model-arch"),
        (["--cpus", "inf"], {}, "--cpus"),  # passed, then overflowed in the engine
        (["--drain-timeout", "nan"], {}, "--drain-timeout"),
        (["--chat-template", "/etc/fleetlm/chatml.jinja"], {}, "neither a Jinja template nor a readable file"),
    ],
)
def test_bad_values_are_rejected_by_name(argv, env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(argv, env)


def test_unknown_keys_in_the_file_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(["--config", str(bad)], {})


def test_help_lists_every_setting():
    out = subprocess.run([sys.executable, "-m", "serving", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ServeConfig.model_fields:
        assert "--" + name.replace("_", "-") in out
    for flag in ("--config", "--model-path", "--api-key", "--queue-capacity", "--workers", "LLM_MODEL_PATH"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--quantization", "q2"], "--quantization"),
        (["--model-path", "./no/such/dir"], "no such file or directory"),
        (["--device", "cpu", "--attention-backend", "triton"], "--attention-backend triton runs on CUDA"),
        (["--attention-backend", "flash"], "--attention-backend"),
    ],
)
def test_start_up_errors_exit_2_with_a_clear_message(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "serving", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_help_shows_each_default_once_lists_choices_and_the_subcommand():
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines anywhere
    options = text.split("options:", 1)[1]
    for name in ServeConfig.model_fields:
        flag = "--" + name.replace("_", "-")
        entry = options.split(f" {flag}", 1)[1].split(" --", 1)[0]
        assert entry.count("default") <= 1, (flag, entry)
        assert "default: None" not in entry, flag
    for flag, choices in {
        "--device": "{auto,cpu,cuda,metal}",
        "--dtype": "{auto,float32,float16,bfloat16}",
        "--quantization": "{none,q8_0,q4_0}",
        "--log-level": "{debug,info,warning,error}",
        "--cpu-affinity": "{auto,none}",
    }.items():
        assert f"{flag} {choices}" in text
    assert "download [-h]" in text.split("options:")[0]  # the usage line names the subcommand


def test_the_console_script_names_itself():
    import shutil

    script = shutil.which("fleetlm")
    if script is None:
        pytest.skip("the fleetlm console script is not installed")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: fleetlm ")
    bad = subprocess.run([script, "--port", "http"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("fleetlm: error:")


def test_a_chat_template_is_inline_or_a_file(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_config(["--chat-template", template], {}).chat_template == template
    (tmp_path / "t.jinja").write_text(template)
    assert load_config(["--chat-template", str(tmp_path / "t.jinja")], {}).chat_template == str(tmp_path / "t.jinja")


def test_the_current_directory_names_the_model_by_its_name(tmp_path, monkeypatch):
    from serving.models.source import served_name

    monkeypatch.chdir(tmp_path)
    assert served_name(load_config(["--model-path", "."], {})) == tmp_path.name


def test_vllm_command_lines_need_no_rewriting():
    cfg = load_config(
        ["Qwen/Qwen2.5-0.5B-Instruct", "--max-model-len", "4096", "--max-num-seqs", "32", "--enforce-eager",
         "--no-enable-prefix-caching", "--tokenizer", "Qwen/Qwen2.5-0.5B"],
        {},
    )  # fmt: skip
    assert cfg.model_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.tokenizer_path == "Qwen/Qwen2.5-0.5B"
    assert (cfg.max_seq_len, cfg.max_batch_size, cfg.cuda_graphs, cfg.prefix_caching) == (4096, 32, False, False)
    assert load_config(["--model", "org/name"], {}).model_path == "org/name"  # not "ambiguous option"
    assert load_config(["--model-path", "org/name", "org/name"], {}).model_path == "org/name"
    with pytest.raises(ConfigError, match="given twice"):
        load_config(["org/one", "--model-path", "org/two"], {})
    assert load_config([], {"LLM_MODEL_PATH": "org/env"}).model_path == "org/env"
    assert load_config(["org/flag"], {"LLM_MODEL_PATH": "org/env"}).model_path == "org/flag"
