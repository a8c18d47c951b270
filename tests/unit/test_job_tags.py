"""Job tags: submitted with a job, shown in its JSON, filtered on by GET /jobs?tag=."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from db.models import JobTag


def _submit(client, headers, tags=None, **extra):
    body = {"kind": "echo", "spec": {"message": "hi"}, **extra}
    if tags is not None:
        body["tags"] = tags
    return client.post("/api/v1/jobs", json=body, headers=headers)


def _ids(client, headers, *filters: str) -> list[str]:
    query = "&".join(f"tag={f}" for f in filters)
    response = client.get(f"/api/v1/jobs?{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [job["id"] for job in response.get_json()["jobs"]]


def test_tags_are_stored_in_their_own_rows_and_shown_on_the_job(client, alice, sessions):
    response = _submit(client, alice, {"team": "nlp", "env": "prod"})

    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["tags"] == {"env": "prod", "team": "nlp"}
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice).get_json()["tags"] == {
        "env": "prod",
        "team": "nlp",
    }
    with sessions() as session:
        rows = session.scalars(select(JobTag).where(JobTag.job_id == job["id"])).all()
    assert sorted((r.key, r.value) for r in rows) == [("env", "prod"), ("team", "nlp")]


def test_a_job_without_tags_shows_an_empty_mapping(client, alice):
    assert _submit(client, alice).get_json()["tags"] == {}


def test_filters_are_anded_and_a_key_alone_matches_any_value(client, alice):
    nlp_prod = _submit(client, alice, {"team": "nlp", "env": "prod"}).get_json()["id"]
    nlp_dev = _submit(client, alice, {"team": "nlp", "env": "dev"}).get_json()["id"]
    vision = _submit(client, alice, {"team": "vision"}).get_json()["id"]
    untagged = _submit(client, alice).get_json()["id"]

    assert _ids(client, alice, "team:nlp") == [nlp_dev, nlp_prod]
    assert _ids(client, alice, "team:nlp", "env:prod") == [nlp_prod]
    assert _ids(client, alice, "env") == [nlp_dev, nlp_prod]
    assert _ids(client, alice, "team:nlp", "env:staging") == []
    assert set(_ids(client, alice)) == {nlp_prod, nlp_dev, vision, untagged}


def test_a_value_may_hold_a_colon_the_filter_splits_at_the_first(client, alice):
    job = _submit(client, alice, {"image": "repo/x:1.2"}).get_json()["id"]
    assert _ids(client, alice, "image:repo/x:1.2") == [job]
    assert _ids(client, alice, "image:repo/x") == []


def test_a_tag_filter_never_shows_another_owners_jobs(client, alice, bob):
    _submit(client, bob, {"team": "nlp"})
    mine = _submit(client, alice, {"team": "nlp"}).get_json()["id"]
    assert _ids(client, alice, "team:nlp") == [mine]


def test_the_filter_pages_with_the_cursor(client, alice):
    tagged = [_submit(client, alice, {"team": "nlp"}).get_json()["id"] for _ in range(3)]
    _submit(client, alice, {"team": "other"})
    first = client.get("/api/v1/jobs?tag=team:nlp&limit=2", headers=alice).get_json()
    rest = client.get(
        f"/api/v1/jobs?tag=team:nlp&limit=2&cursor={first['next_cursor']}", headers=alice
    ).get_json()
    assert [j["id"] for j in first["jobs"] + rest["jobs"]] == tagged[::-1]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    ("tags", "where"),
    [
        ({f"k{i}": "v" for i in range(17)}, ["tags"]),
        ({"bad key": "v"}, ["tags", "bad key", "[key]"]),
        ({"team:x": "v"}, ["tags", "team:x", "[key]"]),
        ({"-lead": "v"}, ["tags", "-lead", "[key]"]),
        ({"k" * 65: "v"}, ["tags", "k" * 65, "[key]"]),
        ({"team": ""}, ["tags", "team"]),
        ({"team": "a b"}, ["tags", "team"]),
        ({"team": "v" * 129}, ["tags", "team"]),
        ({"team": 5}, ["tags", "team"]),
        (["team", "nlp"], ["tags"]),
    ],
)
def test_bad_tags_are_422_naming_the_field_and_nothing_is_queued(client, alice, sent, tags, where):
    response = _submit(client, alice, tags)

    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "invalid_body"
    assert [e["loc"] for e in body["errors"]] == [where]
    assert "should match pattern" not in body["detail"]  # in words, not a regex
    assert sent == []


def test_sixteen_tags_of_the_longest_sizes_are_accepted(client, alice):
    tags = {f"{i:02d}" + "k" * 62: "v" * 128 for i in range(16)}
    response = _submit(client, alice, tags)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["tags"] == tags


@pytest.mark.parametrize("bad", ["bad key:x", ":nlp", "team:", "team:a b"])
def test_a_malformed_tag_filter_is_400(client, alice, bad):
    response = client.get("/api/v1/jobs", query_string={"tag": bad}, headers=alice)
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_request"
    assert "tag filter" in response.get_json()["detail"]


def test_more_filters_than_tags_a_job_can_hold_are_400(client, alice):
    response = client.get(
        "/api/v1/jobs", query_string=[("tag", f"k{i}") for i in range(17)], headers=alice
    )
    assert response.status_code == 400
