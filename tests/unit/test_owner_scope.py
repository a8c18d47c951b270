"""Every owner-scoped route, API and UI, taken from the app's url_map: another owner's
resource answers 404 (and is left as it was), and a listing shows only the caller's rows.

The routes are not listed by hand: a new route with a path parameter must either map the
parameter to another owner's resource here or be named in EXEMPT with the reason, so a new
route cannot be skipped silently."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import Rule

from db import datasets, registry, schedules
from db.base import utcnow
from db.models import Dataset, Job, Model, ModelVersion, Schedule
from kiln.artifacts import ArtifactStore
from kiln.datasets import DatasetInfo
from kiln.settings import Settings

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: Routes that are not an owner's lookup, and why.
EXEMPT = {
    "static": "the app's own files",
    "api.revoke_key": "admin only (403 for a user); keys are not an owner's resources",
    "api.upload_version": "creates a version in the caller's own namespace",
    "ui.new_job": "a form per job kind",
    "ui.new_schedule": "a form per job kind",
}
#: Listings without a path parameter that show no owner's rows.
NOT_LISTINGS = {
    "api.openapi", "api.list_keys", "api.list_workers", "health.healthz", "health.readyz",
    "metrics", "ui.home", "ui.signin", "ui.new_job_menu",
    "api.webhook_secret",  # the caller's own signing secret, no rows of anyone's
}  # fmt: skip

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Owned:
    """One owner's resources, and strings that show them on a page or in a JSON body."""

    job: str
    dataset: str
    model_id: str
    model: str
    schedule: str

    @property
    def markers(self) -> list[str]:
        return [self.job[:8], self.dataset, self.model, self.schedule]


def _resources(sessions: sessionmaker[Session], store: ArtifactStore, owner: str) -> Owned:
    stored = store.put_bytes(f"x,label\n1,{owner}\n".encode())
    described = {"digest": stored.digest, "size": stored.size, "format": "csv", "rows": 1}
    with sessions() as session:
        job = Job(
            kind="batch_predict", owner=owner, spec={}, queue="cpu", state="succeeded",
            attempt=1, progress=1.0, message="succeeded", error_type=None,
            result={"output": described, "error_file": described},
        )  # fmt: skip
        job.finished_at = job.created_at = job.started_at = utcnow()
        session.add(job)
        info = DatasetInfo(format="csv", rows=1, columns=[{"name": "x", "dtype": "int64"}])
        dataset = datasets.create(
            session, owner=owner, name=f"{owner}s-data", info=info, size_bytes=stored.size,
            digest=stored.digest,
        )  # fmt: skip
        version = registry.register_version(
            session, owner=owner, name=f"{owner}s-model", source_job_id=None, arch="mlp",
            config={}, metrics={}, artifact_digest=stored.digest, artifact_size=stored.size,
            dataset_digest=None,
        )  # fmt: skip
        model = session.get_one(Model, version.model_id)
        model.aliases = {"production": 1}
        version.exports = {"torchscript": {"digest": stored.digest, "size": stored.size}}
        schedule = schedules.create(
            session, owner=owner, name=f"{owner}s-nightly", cron="0 2 * * *", kind="echo",
            spec={"message": "hi"}, priority=0, enabled=True,
        )  # fmt: skip
        session.commit()
        return Owned(job.id, dataset.id, model.id, model.name, schedule.id)


def _arguments(theirs: Owned) -> dict[str, str]:
    """What each path parameter is filled with: the other owner's resource."""
    return {
        "job_id": theirs.job,
        "dataset_id": theirs.dataset,
        "schedule_id": theirs.schedule,
        "model_id": theirs.model_id,
        "name": theirs.model,
        "version": "1",
        "number": "1",
        "alias": "production",
        "what": "output",
    }


def _owner_rules(app: Flask) -> list[Rule]:
    return [r for r in app.url_map.iter_rules() if r.endpoint.split(".")[0] in ("api", "ui")]


def _sign_in(client: FlaskClient, key: str) -> str:
    token = _TOKEN.search(client.get("/signin").text)
    assert token is not None
    client.post("/signin", data={"api_key": key, "csrf_token": token.group(1)})
    found = _TOKEN.search(client.get("/datasets").text)
    assert found is not None, "not signed in"
    return found.group(1)


@pytest.fixture
def world(sessions: sessionmaker[Session], settings: Settings) -> tuple[Owned, Owned]:
    store = ArtifactStore(settings.artifacts_dir)
    return _resources(sessions, store, "alice"), _resources(sessions, store, "bob")


def test_another_owners_resource_is_404_on_every_route(
    app: Flask,
    client: FlaskClient,
    create_key: Callable[..., str],
    world: tuple[Owned, Owned],
    sessions: sessionmaker[Session],
) -> None:
    _, bobs = world
    key = create_key("alice")
    api = {"Authorization": f"Bearer {key}"}
    csrf = _sign_in(client, key)
    arguments = _arguments(bobs)
    walked = []
    for rule in _owner_rules(app):
        if not rule.arguments or rule.endpoint in EXEMPT:
            continue
        unknown = rule.arguments - arguments.keys()
        assert not unknown, f"{rule.rule}: map {unknown} to another owner's resource, or exempt"
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", arguments[name])
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if rule.endpoint.startswith("api."):
                body = {"version": 1} if method == "PUT" else None
                response = client.open(path, method=method, headers=api, json=body)
            else:
                response = client.open(path, method=method, data={"csrf_token": csrf})
            assert response.status_code == 404, f"{method} {path}: {response.status_code}"
            walked.append(rule.endpoint)
    assert {"api.get_job", "api.delete_dataset", "ui.download", "ui.delete_version"} <= set(walked)

    with sessions() as session:  # nothing of bob's was changed by the attempts
        assert session.get_one(Job, bobs.job).state == "succeeded"
        assert session.get(Dataset, bobs.dataset) is not None
        assert session.get_one(Model, bobs.model_id).aliases == {"production": 1}
        assert session.query(ModelVersion).filter_by(model_id=bobs.model_id).count() == 1
        assert session.get_one(Schedule, bobs.schedule).enabled


def test_listings_show_only_the_callers_rows(
    app: Flask, client: FlaskClient, create_key: Callable[..., str], world: tuple[Owned, Owned]
) -> None:
    alices, bobs = world
    key = create_key("alice")
    api = {"Authorization": f"Bearer {key}"}
    _sign_in(client, key)
    listed = []
    for rule in _owner_rules(app):
        if rule.arguments or "GET" not in rule.methods or rule.endpoint in NOT_LISTINGS:
            continue
        headers = api if rule.endpoint.startswith("api.") else {}
        response = client.get(rule.rule, headers=headers)
        assert response.status_code == 200, rule.rule
        text = response.get_data(as_text=True)
        assert not [m for m in bobs.markers if m in text], f"{rule.rule} shows bob's rows"
        assert [m for m in alices.markers if m in text], f"{rule.rule} lists none of alice's"
        listed.append(rule.endpoint)
    assert {"api.list_jobs", "api.list_datasets", "ui.jobs", "ui.models"} <= set(listed)
