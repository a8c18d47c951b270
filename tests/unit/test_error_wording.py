"""How refusals read: webhook refusals name the address and the operator's setting,
pydantic's "Value error, " never reaches a user, a model-level error names its field,
true/false are not numbers, and a bad KILN_* setting is one line naming the variable."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kiln.cli import main


def _submit(client, headers, **fields):
    body = {"kind": "echo", "spec": {"message": "hi"}, **fields}
    return client.post("/api/v1/jobs", json=body, headers=headers)


def test_a_loopback_webhook_is_refused_in_plain_words_naming_the_operator_setting(client, alice):
    problem = _submit(client, alice, webhook_url="http://127.0.0.1:8000/hook").get_json()

    assert problem["detail"].startswith("webhook_url refused: 127.0.0.1 is a loopback address;")
    assert "resolves to" not in problem["detail"]
    assert "KILN_WEBHOOK_ALLOW_PRIVATE" in problem["detail"]
    assert "KILN_WEBHOOK_ALLOWED_CIDRS" in problem["errors"][0]["msg"]


def test_field_messages_carry_no_pydantic_prefix(client, alice):
    problem = _submit(client, alice, webhook_url="ftp://example.com/hook").get_json()

    assert problem["errors"][0] == {
        "loc": ["webhook_url"],
        "msg": "only http and https URLs are allowed",
    }
    assert "Value error" not in problem["detail"]


def test_webhook_events_without_a_url_name_the_field(client, alice):
    problem = _submit(client, alice, webhook_events=["succeeded"]).get_json()

    assert problem["errors"] == [{"loc": ["webhook_events"], "msg": "needs a webhook_url"}]
    assert problem["detail"] == "webhook_events: needs a webhook_url"


def test_an_empty_webhook_url_says_it_is_empty(client, alice):
    problem = _submit(client, alice, webhook_url="").get_json()

    assert problem["errors"] == [{"loc": ["webhook_url"], "msg": "the URL is empty"}]


@pytest.mark.parametrize("field", ["expires_after", "deadline_s", "priority"])
def test_true_is_not_a_number(client, alice, field):
    response = _submit(client, alice, **{field: True})

    assert response.status_code == 422
    problem = response.get_json()
    assert problem["errors"] == [{"loc": [field], "msg": "must be a number, not true or false"}]


def test_a_bad_setting_is_one_line_naming_the_environment_variable(tmp_path):
    result = CliRunner().invoke(
        main,
        ["run"],
        env={"KILN_SWEEP_INTERVAL_S": "hourly", "KILN_DATA_DIR": str(tmp_path)},
    )

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("kiln: KILN_SWEEP_INTERVAL_S: ")
    assert "valid number" in lines[0]
    assert "sweep_interval_s" not in lines[0]
    assert "Traceback" not in result.output
