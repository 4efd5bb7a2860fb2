from pathlib import Path

from serving.config import ServeConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "python -m serving" in first_block
    assert "pytest" in first_block


def test_every_setting_is_documented_with_its_env_var():
    for name in ServeConfig.model_fields:
        assert f"`--{name.replace('_', '-')}`" in README, name
        assert f"`LLM_{name.upper()}`" in README, name
