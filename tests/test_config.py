"""EngineConfig's step-budget defaults per usage context, as resolved and as each command's --help shows them."""

import pytest

from ember.config import EngineConfig, UsageContext, config_from_cli_args

OFFLINE = {"max_num_seqs": 256, "max_num_batched_tokens": 4096}
SERVING = {"max_num_seqs": 128, "max_num_batched_tokens": 2048}


def _budget(config: EngineConfig) -> dict:
    return {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens}


@pytest.mark.parametrize("context,expected", [(UsageContext.OFFLINE, OFFLINE), (UsageContext.SERVING, SERVING),
                                              (UsageContext.ENGINE, SERVING), ("offline", OFFLINE)])
def test_defaults_resolve_from_the_usage_context(context, expected):
    config = EngineConfig(usage_context=context)
    assert _budget(config) == expected
    assert isinstance(config.usage_context, UsageContext)
    assert _budget(EngineConfig()) == SERVING  # an engine built directly


def test_given_values_win_and_are_validated():
    config = EngineConfig(usage_context=UsageContext.OFFLINE, max_num_seqs=8)
    assert _budget(config) == {"max_num_seqs": 8, "max_num_batched_tokens": 4096}
    assert _budget(config.replace(max_num_batched_tokens=64)) == {"max_num_seqs": 8, "max_num_batched_tokens": 64}
    with pytest.raises(ValueError):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError):
        EngineConfig(usage_context="training")


def test_llm_is_offline(monkeypatch):
    from ember.entrypoints import llm as llm_module

    monkeypatch.setattr(llm_module.LLMEngine, "from_config", classmethod(lambda cls, config: config))
    config = llm_module.LLM(dtype="float32").engine  # the config the engine would be built from
    assert config.usage_context is UsageContext.OFFLINE and _budget(config) == OFFLINE
    assert _budget(llm_module.LLM(max_num_batched_tokens=64).engine) == {"max_num_seqs": 256,
                                                                         "max_num_batched_tokens": 64}


@pytest.mark.parametrize("argv,expected", [(["generate", "--prompt", "hi"], OFFLINE), (["chat"], OFFLINE),
                                           (["serve"], SERVING)])
def test_each_command_uses_and_shows_its_defaults(argv, expected, capsys):
    from ember.cli.main import build_parser

    config = config_from_cli_args(build_parser().parse_args(argv), EngineConfig)
    assert _budget(config) == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args([argv[0], "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert f"most requests in one step (default: {expected['max_num_seqs']})" in text
    assert f"token budget of one step (default: {expected['max_num_batched_tokens']})" in text
    assert "usage-context" not in text
