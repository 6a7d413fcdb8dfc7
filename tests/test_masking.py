"""Credentials are masked whatever form brought them: keys under storage_options or naming a secret, whole
maps given to --set, passwords in URLs."""

from __future__ import annotations

import pytest

from orchestrator import spec as specs
from orchestrator.masking import is_secret, masked, redact, redact_argv


@pytest.mark.parametrize(
    "key",
    ["data.storage_options", "data.storage_options.client_kwargs.endpoint_url", "key", "secret", "token",
     "aws_secret_access_key", "account_key", "sas_token", "password", "db_passwd", "credentials",
     "private_key_id", "api_keys", "x.KEY"],
)  # fmt: skip
def test_keys_that_hold_credentials_are_secret(key):
    assert is_secret(key)


def test_no_field_of_the_spec_but_storage_options_is_secret():
    assert [k for k in specs.grid_keys() if is_secret(k)] == ["data.storage_options"]
    assert not any(map(is_secret, ("monkey", "keyboard", "token_count_x".replace("token", "tok"))))


def test_masked_replaces_secret_members_at_any_depth_and_passwords_in_urls():
    value = {"train": "s3://u:pw@b/x", "storage_options": {"key": "K"}, "more": [{"token": "T"}, 1]}
    assert masked("data", value) == {
        "train": "s3://***@b/x", "storage_options": "***", "more": [{"token": "***"}, 1]
    }  # fmt: skip
    assert masked("data.storage_options", {"endpoint_url": "http://x"}) == "***"


def test_passwords_written_into_urls_are_masked():
    assert redact("http://user:pw@mlflow:5000/#/x") == "http://***@mlflow:5000/#/x"
    assert redact("s3://bucket/a@b.tar") == "s3://bucket/a@b.tar"  # an @ past the host is no password


def test_every_form_of_a_credential_on_the_command_line_is_masked():
    argv = [
        "sweep", "s.yaml", "--set", "data.storage_options.secret=S1", "--set", "train.epochs=2",
        "--set=data.storage_options={key: S2}",
        "--set", "data={train: x, val: y, storage_options: {key: S3}}",
        "--set", "grid.norm=[bn, {token: S4}]", "--set", "data={train: [x, {key: S5}]",
        "data.storage_options=S6", "--set", "data.train=s3://AK:S7@b/x", "--out=http://u:S8@h/",
    ]  # fmt: skip
    assert redact_argv(argv) == [
        "sweep", "s.yaml", "--set", "data.storage_options.secret=***", "--set", "train.epochs=2",
        "--set=data.storage_options=***", "--set", "data={train: x, val: y, storage_options: '***'}",
        "--set", "grid.norm=[bn, {token: '***'}]", "--set", "data=***",  # unreadable YAML: all of it
        "data.storage_options=***", "--set", "data.train=s3://***@b/x", "--out=http://***@h/",
    ]  # fmt: skip


def test_arguments_without_credentials_are_kept_as_typed():
    argv = ["--set", "grid.train.lr=[1e-3,  2e-3]", "--set", "grid.tracking.experiment=['key',  monkey]",
            "a=b=c"]  # fmt: skip
    assert redact_argv(argv) == argv
