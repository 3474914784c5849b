"""Environment variables: one module, each documented, read when used, all listed in the README."""
import os

from ember import envs


def test_every_variable_is_documented_and_listed_in_the_readme():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name, var in envs.ENVIRONMENT_VARIABLES.items():
        assert name.startswith("EMBER_") and len(var.doc) > 20
        assert f"`{name}`" in readme, f"{name} is missing from the README"


def test_values_are_read_when_used(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_DISABLE_AMX", "1")
    assert envs.EMBER_DISABLE_AMX is True
    monkeypatch.setenv("EMBER_DISABLE_AMX", "0")
    assert envs.EMBER_DISABLE_AMX is False
    monkeypatch.setenv("EMBER_KERNELS_DIR", str(tmp_path))
    assert envs.EMBER_KERNELS_DIR == str(tmp_path)
    monkeypatch.delenv("EMBER_CACHE_DIR", raising=False)
    assert envs.EMBER_CACHE_DIR.endswith(os.path.join(".cache", "ember"))


def test_unknown_names_raise():
    import pytest

    with pytest.raises(AttributeError):
        envs.EMBER_NOT_A_VARIABLE
