"""Scaling out: workers on two "hosts" that share nothing but URLs (one PostgreSQL, one Redis,
one S3 bucket served by moto); a model trained on host A is used for predictions on host B."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ops_support import LiveServer, Worker, free_port, make_key, worker_env

from kiln import routing
from kiln.client import Client
from kiln.settings import Settings
from workers.launch import WorkerProcess

pytestmark = pytest.mark.integration

BUCKET = "kiln-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A local S3 (moto's server) with an empty bucket."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    s3.create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def shared(
    pg_url: str,
    broker_url: str,
    s3_endpoint: str,
    monkeypatch_module: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> Settings:
    """What every host is told: the database, the broker and the artifacts URL."""
    for name, value in AWS_ENV.items():
        monkeypatch_module.setenv(name, value)
    return Settings(
        data_dir=tmp_path_factory.mktemp("web-host"),
        database_url=pg_url,
        redis_url=broker_url,
        artifacts_url=f"s3://{BUCKET}/artifacts",
        artifacts_endpoint_url=s3_endpoint,
    )


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def start_host(
    name: str, shared: Settings, start_worker: Callable[..., Worker], data_dir: Path
) -> Worker:
    """A Celery worker named `name`@host with its own data directory, as on another host."""
    settings = shared.model_copy(update={"data_dir": data_dir})
    env = worker_env(
        settings,
        KILN_ARTIFACTS_URL=shared.artifacts_url,
        KILN_ARTIFACTS_ENDPOINT_URL=shared.artifacts_endpoint_url,
        **AWS_ENV,
    )
    return start_worker(
        WorkerProcess(name=name, queues=routing.CPU_QUEUES_BOTH_LANES, env={}).argv(), env
    )


def test_a_model_trained_on_one_host_predicts_on_another(
    shared: Settings,
    serve: Callable[[Settings], LiveServer],
    start_worker: Callable[..., Worker],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    web = serve(shared)
    client = Client(web.url, make_key(shared.database_url, "frank"))
    csv = tmp_path / "xor.csv"
    rows = [f"{a},{b},{a ^ b}" for a in (0, 1) for b in (0, 1)] * 20
    csv.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    dataset = client.upload_dataset(csv)  # lands in S3 through the web host

    host_a = tmp_path_factory.mktemp("host-a")
    worker_a = start_host("hosta", shared, start_worker, host_a)
    spec = {
        "model_name": "xor",
        "dataset": dataset["id"],
        "epochs": 2,
        "arch_params": {"hidden": [8]},
    }
    trained = client.wait(client.submit("train", spec)["id"], poll_s=0.5, timeout_s=240)
    assert trained["state"] == "succeeded", (trained, worker_a.output()[-3000:])
    assert trained["worker"].startswith("hosta@")
    worker_a.stop()  # from here on only host B can run anything

    host_b = tmp_path_factory.mktemp("host-b")
    worker_b = start_host("hostb", shared, start_worker, host_b)
    inputs = [[0, 1], [1, 1]]
    predicted = client.wait(
        client.submit("predict", {"model": "xor", "inputs": inputs})["id"],
        poll_s=0.5,
        timeout_s=240,
    )
    assert predicted["state"] == "succeeded", (predicted, worker_b.output()[-3000:])
    assert predicted["worker"].startswith("hostb@")
    assert len(predicted["result"]["predictions"]) == 2

    digest = client.model_version("xor", "latest")["artifact_digest"]
    boto3 = pytest.importorskip("boto3")
    s3 = boto3.client("s3", endpoint_url=shared.artifacts_endpoint_url, **_boto_credentials())
    weights = s3.get_object(Bucket=BUCKET, Key=f"artifacts/{digest[:2]}/{digest}")["Body"].read()
    assert hashlib.sha256(weights).hexdigest() == digest
    # A wrote the weights; B fetched its own copy from S3 (nothing on disk is shared).
    assert (host_a / "artifacts" / digest[:2] / digest).read_bytes() == weights
    assert (host_b / "artifacts" / digest[:2] / digest).read_bytes() == weights
    assert not (shared.data_dir / "artifacts" / digest[:2] / digest).exists()
