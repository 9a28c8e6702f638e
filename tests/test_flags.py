"""Settings as flags and environment variables: booleans, repeatable flags, cross-checks."""

from __future__ import annotations

import argparse

import pytest

from service.core.flags import add_arguments, from_arguments, parse_bool
from service.core.settings import (
    RESTRICTED_GROUPS,
    SettingError,
    Settings,
    parse_restriction,
)
from service.wire.restrictions import GROUPS


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), False),
        (("--allow-model-upload",), True),
        (("--allow-model-upload=true",), True),
        (("--allow-model-upload", "TRUE"), True),
        (("--allow-model-upload=false",), False),
        (("--allow-model-upload", "--no-allow-model-upload"), False),
        (("--no-allow-model-upload", "--allow-model-upload=on"), True),
    ],
)
def test_a_boolean_takes_the_bare_form_tritons_form_and_no(
    argv: tuple[str, ...], expected: bool
) -> None:
    assert parse(*argv).allow_model_upload is expected


def test_a_bare_boolean_before_another_flag_does_not_eat_it() -> None:
    chosen = parse("--no-reflection", "--exit-on-error", "--grpc-port", "9000")
    assert chosen.reflection is False and chosen.exit_on_error is True
    assert chosen.grpc_port == 9000


def test_a_boolean_refuses_other_words() -> None:
    with pytest.raises(SystemExit):
        parse("--reflection=maybe")
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        parse_bool("maybe")


def test_boolean_and_repeatable_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_EXIT_ON_ERROR", "false")
    monkeypatch.setenv("CONVSERVE_MODEL_CONTROL_MODE", "explicit")
    monkeypatch.setenv("CONVSERVE_LOAD_MODEL", "digits, other")
    monkeypatch.setenv(
        "CONVSERVE_GRPC_RESTRICTED_PROTOCOL", "model-repository:admin=s3cret;health,metadata:k=v"
    )
    chosen = parse()
    assert chosen.exit_on_error is False
    assert chosen.load_model == ("digits", "other")
    assert chosen.grpc_restricted_protocol == (
        "model-repository:admin=s3cret",
        "health,metadata:k=v",
    )
    # a flag replaces the variable's list on its first use, and repeats add to it
    assert parse("--load-model", "a", "--load-model", "b").load_model == ("a", "b")


def test_the_environment_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = Settings(
        model_control_mode="explicit",
        load_model=("a", "b"),
        exit_on_error=False,
        grpc_restricted_protocol=("statistics:k=v", "health,metadata:x=y"),
    )
    for name, value in chosen.environment().items():
        monkeypatch.setenv(name, value)
    assert parse() == chosen


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"load_model": ("digits",)}, "--load-model requires --model-control-mode explicit"),
        (
            {"grpc_use_ssl": True},
            "TLS on the gRPC port needs --grpc-server-cert and --grpc-server-key",
        ),
        (
            {"grpc_use_ssl_mutual": True, "grpc_server_cert": "c", "grpc_server_key": "k"},
            "TLS on the gRPC port needs --grpc-root-cert",
        ),
        ({"grpc_restricted_protocol": ("health",)}, "must be <groups>:<key>=<value>, got 'health'"),
        ({"grpc_restricted_protocol": ("admin:k=v",)}, r"unknown group\(s\) admin; the groups are"),
        ({"repository_poll_secs": 0.0}, "invalid setting repository_poll_secs=0.0"),
        ({"health_port": -2}, "invalid setting health_port=-2"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_mutual_tls_implies_tls() -> None:
    chosen = Settings(
        grpc_use_ssl_mutual=True, grpc_server_cert="c", grpc_server_key="k", grpc_root_cert="r"
    )
    assert chosen.tls and not chosen.grpc_use_ssl


def test_a_restriction_names_its_header_in_lower_case() -> None:
    restriction = parse_restriction("model-repository, statistics:Admin-Key=Secret")
    assert restriction.groups == {"model-repository", "statistics"}
    assert restriction.header == "triton-grpc-protocol-admin-key"
    assert restriction.value == "Secret"


def test_every_group_name_has_its_rpcs() -> None:
    assert set(GROUPS) == set(RESTRICTED_GROUPS)
    served = {m for methods in GROUPS.values() for m in methods}
    assert "/inference.GRPCInferenceService/RepositoryModelUnload" in GROUPS["model-repository"]
    assert len(served) == sum(len(m) for m in GROUPS.values())  # no RPC in two groups
