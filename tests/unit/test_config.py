from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from headswap.server.config import ServerConfig


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    config = ServerConfig.from_sources(parse([]), environ={})
    assert config.port == 50051 and config.device == "auto" and config.backbone is None
    assert config.uses_default_backbone and config.backbone_dir.name == "all-MiniLM-L6-v2"


def test_flag_beats_environment_beats_default(tmp_path: Path) -> None:
    env = {"HEADSWAP_PORT": "6000", "HEADSWAP_BACKBONE": str(tmp_path), "HEADSWAP_GRACE_SECONDS": "2.5"}
    config = ServerConfig.from_sources(parse(["--port", "7000"]), environ=env)
    assert config.port == 7000
    assert config.backbone == tmp_path and not config.uses_default_backbone
    assert config.grace_seconds == 2.5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HEADSWAP_PORT": "seventy"}, "port must be a number"),
        ({"HEADSWAP_PORT": "70000"}, "outside 0..65535"),
        ({"HEADSWAP_DEVICE": "tpu"}, "device must be"),
        ({"HEADSWAP_MAX_BATCH_INPUTS": "0"}, "at least 1"),
        ({"HEADSWAP_PRECISION": "int4"}, "precision must be auto, fp32, fp16 or int8"),
        ({"HEADSWAP_BATCH_MAX_PADDING": "1.5"}, "batch max padding must be at most 1"),
        ({"HEADSWAP_INTRA_OP_SPIN": "maybe"}, "intra op spin must be one of"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_sources(parse([]), environ=env)


def test_cpu_serving_options() -> None:
    config = ServerConfig.from_sources(parse([]), environ={})
    assert config.precision == "auto" and not config.intra_op_spin and config.batching.max_padding == 0.3
    argv = ["--precision", "int8", "--intra-op-spin", "true", "--batch-max-padding", "0.5"]
    config = ServerConfig.from_sources(parse(argv), environ={"HEADSWAP_INTRA_OP_SPIN": "off"})
    assert config.precision == "int8" and config.intra_op_spin and config.batching.max_padding == 0.5


def test_boolean_settings_are_flags() -> None:
    """`--store-migrate` alone turns it on and `--no-store-migrate` off, over the environment; a value still works."""
    on = {"HEADSWAP_STORE_MIGRATE": "true", "HEADSWAP_STRICT_PRECISION": "true"}
    config = ServerConfig.from_sources(parse(["--store-migrate", "--strict-precision"]), environ={})
    assert config.store.migrate and config.strict_precision
    config = ServerConfig.from_sources(parse(["--no-store-migrate", "--no-strict-precision"]), environ=on)
    assert not config.store.migrate and not config.strict_precision
    config = ServerConfig.from_sources(
        parse(["--intra-op-spin", "false"]), environ={"HEADSWAP_INTRA_OP_SPIN": "1"}
    )
    assert not config.intra_op_spin
    with pytest.raises(SystemExit):  # argparse refuses a value after --no-...
        parse(["--no-store-migrate", "true"])


def test_every_field_has_an_env_variable_and_help() -> None:
    from headswap.server.config import OPTIONS

    for opt in OPTIONS:
        assert opt.env == "HEADSWAP_" + opt.key.upper() and opt.flag == "--" + opt.key.replace("_", "-")
        assert opt.help


def test_help_lists_every_setting() -> None:
    """`headswap serve --help` renders (a help text may hold a %) and names every flag with its variable."""
    from headswap.server.config import OPTIONS

    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    shown = parser.format_help()
    for opt in OPTIONS:
        assert opt.flag in shown and f"[{opt.env}]" in shown, opt.key
    assert "0.5% off fp32's" in shown


def test_cli_defaults_are_the_runtime_defaults() -> None:
    """An empty command line with no HEADSWAP_* variable gives the config the server builds by itself: every
    field is a declared setting, at its declared default, and the policy objects built from the config take
    those values."""
    from dataclasses import fields

    from headswap.server.config import (
        OPTIONS,
        AuthConfig,
        BatchingConfig,
        LimitsConfig,
        StoreConfig,
        TlsConfig,
    )
    from headswap.server.inference.policy import BatchPolicy

    config = ServerConfig.from_sources(parse([]), environ={})
    assert config == ServerConfig()
    sections = {
        "batching": BatchingConfig,
        "limits": LimitsConfig,
        "store": StoreConfig,
        "auth": AuthConfig,
        "tls": TlsConfig,
    }
    settings = {(None, f.name) for f in fields(ServerConfig) if f.name not in sections}
    settings |= {(name, f.name) for name, cls in sections.items() for f in fields(cls)}
    assert settings == {(opt.section, opt.field) for opt in OPTIONS}
    for opt in OPTIONS:
        section = config if opt.section is None else getattr(config, opt.section)
        expected = opt.factory() if opt.factory is not None else opt.default
        assert getattr(section, opt.field) == expected, opt.key
    batching = config.batching
    for on_gpu, items, cost in ((False, 16, 4096), (True, 256, 65536)):
        assert batching.policy(on_gpu) == BatchPolicy(
            max_batch_cost=cost,
            max_batch_items=items,
            max_wait_s=batching.max_wait_ms / 1000.0,
            max_queue_items=batching.max_queue_items,
            max_queue_wait_s=batching.max_queue_wait_ms / 1000.0,
            max_padding=batching.max_padding,
        )


def test_the_event_loop_setting_picks_uvloop_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from headswap.server.loops import loop_factory

    assert loop_factory("asyncio") is None
    if sys.platform != "win32":  # the server extra installs it there: auto must find it, not fall back
        import uvloop

        assert loop_factory("auto") is uvloop.new_event_loop
        loop = loop_factory("uvloop")()  # type: ignore[misc]
        assert isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    assert loop_factory("auto") is None
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop_factory("uvloop")
