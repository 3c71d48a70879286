"""The one settings object of the horde.

Every process builds it once in its entry point (``Settings()``) and passes it down; nothing
reads the environment anywhere else. Every field can be set with an environment variable
``HORDE_<FIELD>`` (for example ``HORDE_RABBITMQ_URL``) or in a ``.env`` file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    # --- the dispatcher (api/dispatcher.py): workers ask, it hands them leased jobs ------------------
    ask_refresh_seconds: float = Field(
        10.0, description="A waiting worker repeats its ask this often (a new dispatcher learns it then).")
    dispatch_hold: int = Field(
        8, description="Jobs of a model's queue the dispatcher holds at most while workers wait for that model "
                       "(its consumer's prefetch): it looks past that many heads for one that fits a waiting "
                       "worker (too large for it, say). It takes jobs out only while workers wait.")
    dispatch_linger_seconds: float = Field(
        10.0, ge=0, description="How long the dispatcher keeps consuming a model's queue after the last worker "
                                "waiting for it was served, before putting what it holds back (a model asked for "
                                "every few seconds then costs no cancel, re-consume and redelivery between asks).")
    max_leases_per_worker: int = Field(
        3, description="Live leases a worker may hold: one generating, one claimed ahead, one finishing.")
    dispatch_retry_after_seconds: float = Field(
        1.0, description="How long a worker told 'not now' (paused, at its lease cap) waits before asking again.")
    ledger_prefetch: int = Field(
        1000, description="Deliveries the ledger holds unacked at most; it settles up to half of them per "
                          "transaction while the other half arrives (issue 7: 1000 measured faster than 500).")
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
    # broker watchdog (issue 6, api/watchdog.py)
    watchdog_stats_seconds: float = Field(
        5.0, description="RabbitMQ's collect_statistics_interval: how stale the management API's "
                         "channel figures may be; the watchdog judges a quiet channel's drops after three times this.")
    # --- requesters (issue 6) -------------------------------------------------------------------
    # (rate limits, corrupt prompts and size limits are added here by their modules)
    # Requester limits (api/ratelimit.py, api/moderation.py, api/prompt_guard.py). Rates are per
    # second, sustained, with a burst on top; 0 turns a limit off. Each API process counts alone.
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IPs or CIDRs of reverse proxies whose X-Forwarded-For names the client; "
                    "empty: the client is the socket's peer.")
    submit_rate_per_ip: float = Field(10.0, description="Submissions (image and text) per second per IP (0: off).")
    submit_burst_per_ip: int = Field(100, description="Submissions an IP may send at once before the rate applies.")
    submit_rate_per_key: float = Field(2.0, description="Submissions per second per account (0: off).")
    submit_burst_per_key: int = Field(40, description="Submissions an account may send at once.")
    submit_rate_anonymous: float = Field(
        60.0, description="Submissions per second of the shared anonymous account, all clients together (0: off).")
    submit_burst_anonymous: int = Field(300, description="Burst of the anonymous account.")
    poll_rate_per_ip: float = Field(20.0, description="Status polls (check, status, text status) per second per IP.")
    poll_burst_per_ip: int = Field(200, description="Status polls an IP may send at once.")
    poll_rate_per_key: float = Field(10.0, description="Status polls per second per apikey header (anonymous: IP only).")
    poll_burst_per_key: int = Field(100, description="Status polls an apikey may send at once.")
    max_queued_jobs_per_user: int = Field(
        100, description="Jobs (images or texts) an account may have queued or generating at once (0: no cap).")
    max_queued_jobs_anonymous: int = Field(1000, description="The same for the shared anonymous account (0: no cap).")
    queued_jobs_refresh_ms: int = Field(
        1000, description="How stale an API process's count of a user's queued jobs may be before it re-reads it.")
    max_prompt_chars: int = Field(30_000, description="Longest image prompt (with its negative prompt).")
    max_text_prompt_chars: int = Field(500_000, description="Longest text prompt.")
    max_image_pixels: int = Field(3072 * 3072, description="Largest width x height of a requested image.")
    max_image_steps: int = Field(500, description="Most sampling steps of an image request.")
    max_generations_per_request: int = Field(20, description="Largest n (images or texts) of one request.")
    max_source_image_bytes: int = Field(
        10 * 1024 * 1024, description="Largest source_image or source_mask, decoded, in bytes.")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="Largest request body; larger ones get 413 unread.")
    corrupt_prompt_patterns_file: Path | None = Field(
        None, description="'group: regex' lines; a prompt matching every group is corrupt. Default: built in.")
    screen_text_prompts: bool = Field(True, description="Screen text prompts for corrupt content too.")
    ip_timeout_base_seconds: float = Field(
        180.0, description="An IP's first corrupt prompt times it out this long; each further hit in 24 h doubles it.")
    ip_timeout_max_seconds: float = Field(86_400.0, description="The longest IP timeout.")
    ip_timeouts_refresh_seconds: float = Field(
        2.0, description="How often each API process re-reads the timed-out IPs (others' hits show within this).")

    log_level: str = "INFO"
    # --- observability (issue 7): log format (cli/logs.py) ---------------------------------------
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line with a job_id field on job lines.")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'horde.db').resolve()}"

    @property
    def resolved_results_dir(self) -> Path:
        return self.results_dir or self.state_dir / "results"
