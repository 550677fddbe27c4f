"""Config from environment variables: every field is read from its upper-case variable,
typed, validated, and a bad value is refused with the variable's name."""

from __future__ import annotations

import dataclasses

import pytest

from thinker.core.config import Config
from thinker.core.errors import ConfigurationError

pytestmark = pytest.mark.unit

# A valid value for every string field whose values are checked (the rest take any text).
STRING_VALUES = {
    "device": "cuda:1", "torch_threads": "3", "log_level": "DEBUG", "log_format": "json", "base_model": "builtin-tiny",
    "executor": "ray", "compute_cpus": "0-1",
}


def _override(field: dataclasses.Field) -> tuple[str, object]:
    """A raw environment value for ``field`` unlike its default, and what it should parse to."""
    kind = str(field.type)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if kind.startswith("bool"):
        return ("off", False) if default else ("yes", True)
    if kind.startswith("int"):
        return str(default + 7), default + 7
    if kind.startswith("float"):
        return str(default + 2.5), default + 2.5
    value = STRING_VALUES.get(field.name, f"value-of-{field.name}")
    return value, value


def test_unset_and_empty_variables_keep_the_dataclass_defaults():
    assert Config.from_env({}) == Config()
    assert Config.from_env({f.name.upper(): "" for f in dataclasses.fields(Config)}) == Config()


@pytest.mark.parametrize("field", dataclasses.fields(Config), ids=lambda f: f.name.upper())
def test_every_field_reads_its_upper_case_variable(field):
    raw, expected = _override(field)
    config = Config.from_env({field.name.upper(): raw})
    assert getattr(config, field.name) == expected
    # ...and nothing else changes.
    assert dataclasses.replace(config, **{field.name: getattr(Config(), field.name)}) == Config()


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("MAX_WORKERS", "3")
    monkeypatch.setenv("BATCHING", "off")
    config = Config.from_env()
    assert (config.max_workers, config.batching) == (3, False)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" ON ", True), ("0", False), ("FALSE", False), ("no", False)],
)
def test_booleans_accept_the_usual_spellings(raw, expected):
    assert Config.from_env({"BATCHING": raw}).batching is expected


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_WORKERS": "0"}, "MAX_WORKERS"),
        ({"MAX_WORKERS": "2.5"}, "MAX_WORKERS"),
        ({"BATCH_WINDOW_MS": "soon"}, "BATCH_WINDOW_MS"),
        ({"BATCH_WINDOW_MS": "-1"}, "BATCH_WINDOW_MS"),
        ({"USE_MEGATRON": "maybe"}, "USE_MEGATRON"),
        ({"DEVICE": "gpu"}, "DEVICE"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"MAX_RESIDENT_ADAPTERS": "0"}, "MAX_RESIDENT_ADAPTERS"),
        ({"MAX_PENDING": "0"}, "MAX_PENDING"),
        ({"MAX_LORA_RANK": "0"}, "MAX_LORA_RANK"),
        ({"EXECUTOR": "dask"}, "EXECUTOR"),
        ({"WORKERS": "-1"}, "WORKERS"),
        ({"WORKER_CPUS": "0"}, "WORKER_CPUS"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigurationError, match=name):
        Config.from_env(env)


@pytest.mark.parametrize(("raw", "expected"), [("json", "json"), ("JSON", "JSON"), ("Text", "Text")])
def test_log_format_is_case_insensitive(raw, expected):
    assert Config.from_env({"LOG_FORMAT": raw}).log_format == expected
