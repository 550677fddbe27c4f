"""Config from environment variables."""

from __future__ import annotations

import pytest

from config import Config
from errors import ConfigurationError


def test_defaults():
    config = Config.from_env({})
    assert (config.host, config.port, config.max_workers, config.base_model) == ("0.0.0.0", 8000, 4, None)
    assert config.use_megatron is False


def test_environment_overrides():
    config = Config.from_env(
        {"PORT": "8001", "MAX_WORKERS": "8", "BASE_MODEL": "builtin-tiny", "USE_MEGATRON": "false"}
    )
    assert (config.port, config.max_workers, config.base_model, config.use_megatron) == (8001, 8, "builtin-tiny", False)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"MAX_WORKERS": "0"}, "MAX_WORKERS"),
        ({"USE_MEGATRON": "maybe"}, "USE_MEGATRON"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"MAX_RESIDENT_ADAPTERS": "0"}, "MAX_RESIDENT_ADAPTERS"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigurationError, match=name):
        Config.from_env(env)


@pytest.mark.parametrize(("raw", "expected"), [(None, "text"), ("json", "json"), ("JSON", "JSON"), ("text", "text")])
def test_log_format(raw, expected):
    assert Config.from_env({} if raw is None else {"LOG_FORMAT": raw}).log_format == expected
