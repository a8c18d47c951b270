"""Schemathesis against the in-process WSGI app: no 5xx, and every response matches the
OpenAPI document it is generated from (/api/v1/openapi.json)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

#: Examples per operation: enough to find shape mismatches, small enough for ~1 min.
MAX_EXAMPLES = 20


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_api_keeps_its_openapi_promises(app, create_key, create_job):
    create_job(owner="alice")  # something to list and read
    headers = {"Authorization": f"Bearer {create_key('alice')}"}
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                headers=headers, checks=[not_a_server_error, response_schema_conformance]
            )
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:2000]}")
    assert failures == []
    assert statuses.keys() == {operation.label for operation in operations}
    assert 200 in statuses["GET /api/v1/jobs"]  # the key worked: not everything was a 401
