"""The one settings object of the horde.

Every process builds it once in its entry point (``Settings()``) and passes it down; nothing
reads the environment anywhere else. Every field can be set with an environment variable
``HORDE_<FIELD>`` (for example ``HORDE_RABBITMQ_URL``) or in a ``.env`` file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path("var")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HORDE_", env_file=".env", extra="ignore")

    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="AMQP URL of the broker the trusted services use.",
    )
    rabbitmq_management_url: str = Field(
        "http://guest:guest@127.0.0.1:15672/",
        description="Management HTTP API of the broker (vhosts, queue stats, worker users).",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the database (postgresql://…); unset: a SQLite file in state_dir.",
    )
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Where SQLite, results and demo models live.")
    results_dir: Path | None = Field(None, description="Result store on disk; default state_dir/results.")
    api_host: str = "127.0.0.1"
    api_port: int = 7001
    api_workers: int = Field(1, description="uvicorn worker processes for `horde api`.")
    model_reference: Path | None = Field(
        None, description="JSON model reference; default: the one shipped in config/models.json."
    )
    apikey_pepper: str = Field(
        "horde-dev-pepper", description="Secret mixed into API key hashes; set it in production."
    )
    # Leases: how long a worker may hold a claimed job before the reconciler takes it back.
    lease_base_seconds: float = Field(30.0, description="Lease = base + step_seconds x steps x (pixels / 512²) ...")
    lease_step_seconds: float = 2.0
    lease_min_seconds: float = Field(150.0, description="... but never shorter than this.")
    max_attempts: int = Field(3, description="Deliveries of a job before it is faulted.")
    reconcile_interval_seconds: float = 2.0
    republish_after_seconds: float = Field(
        30.0, description="A queued job missing from its queue this long is republished."
    )
    aging_seconds: float = Field(
        120.0, description="Each this many seconds of waiting raises a queued job one priority tier (0: never)."
    )
    uptime_interval_seconds: float = Field(600.0, description="Continuous uptime a worker's owner is paid for.")
    uptime_stale_seconds: float = Field(300.0, description="Silence after which a worker's uptime clock restarts.")
    claim_timeout_seconds: float = 10.0
    ledger_prefetch: int = Field(500, description="Deliveries the ledger settles per transaction at most.")
    trusted_amqp_users: list[str] = Field(
        default_factory=lambda: ["guest"],
        description="AMQP users whose trusted events (job.done, kudos.*) the ledger accepts.",
    )
    registration_open: bool = Field(
        True, description="Anyone may create an account with POST /api/v2/register (else only `horde admin`)."
    )
    # --- untrusted workers (issue 6): their broker users, and the watchdog -----------------------
    worker_user_prefix: str = Field(
        "w-", description="Prefix of the RabbitMQ user created for each registered worker ([a-z0-9-]).")
    worker_amqp_url: str | None = Field(
        None, description="AMQP URL handed to registered workers (host and vhost); default: rabbitmq_url's.")
    worker_max_connections: int = Field(2, description="RabbitMQ connections a worker's user may open.")
    worker_max_channels: int = Field(8, description="RabbitMQ channels a worker's user may open, all together.")
    watchdog_interval_seconds: float = Field(
        2.0, description="How often the broker watchdog reads the management API (0: off).")
    # --- requesters (issue 6) -------------------------------------------------------------------
    # (rate limits, corrupt prompts and size limits are added here by their modules)

    log_level: str = "INFO"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'horde.db').resolve()}"

    @property
    def resolved_results_dir(self) -> Path:
        return self.results_dir or self.state_dir / "results"
