"""The one root settings object.

Precedence, highest first: command-line flags (passed as keyword arguments), ``AICC_*``
environment variables, the YAML file named by ``--config`` / ``AICC_CONFIG``, then the defaults
below. An invalid value stops start-up with a message naming the setting and the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from aicc.errors import ConfigError
from aicc.router.settings import DeploymentSettings, check_unique


def default_model_dir() -> Path:
    """Where aicc keeps model files: ``$XDG_DATA_HOME/aicc/models`` (or ``~/.local/share``)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "aicc" / "models"


def default_state_dir() -> Path:
    """Where aicc keeps its database and secret: ``$XDG_DATA_HOME/aicc`` (or ``~/.local/share``)."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "aicc"


def default_threads() -> int:
    """The CPUs this process may run on (respects affinity masks and container cpusets)."""
    return max(1, len(os.sched_getaffinity(0)))


class LdapSettings(BaseModel):
    """Directory login: bind as `bind_dn`, find the user, bind as the user, map groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1, pattern=r"^ldaps?://")
    """``ldap://host:389`` or ``ldaps://host:636``."""

    start_tls: bool = False
    """Upgrade an ``ldap://`` connection with StartTLS before binding."""

    ca_file: Path | None = None
    """CA bundle that verifies the directory's certificate (LDAPS / StartTLS)."""

    bind_dn: str = Field(min_length=1)
    """Service account that searches for users."""

    bind_password: SecretStr
    """Its password."""

    user_base: str = Field(min_length=1)
    """Subtree searched for users, e.g. ``ou=people,dc=example,dc=org``."""

    user_filter: str = Field(default="(uid={username})", pattern=r"\{username\}")
    """Search filter; ``{username}`` is replaced by the escaped login name (AD: sAMAccountName)."""

    group_base: str | None = None
    """Subtree searched for groups whose `member` is the user (else the user's `memberOf`)."""

    group_roles: dict[str, list[str]] = Field(default_factory=dict)
    """Directory group (cn or full DN) → aicc roles. Users in no mapped group get
    `default_roles`."""

    default_roles: list[str] = Field(default_factory=lambda: ["user"])
    """Roles of a directory user in no mapped group (empty: such users cannot log in)."""

    timeout_s: float = Field(default=5.0, gt=0, le=60)
    """Connect and operation timeout."""


class Settings(BaseSettings):
    """Everything the server reads at start-up. Each field says what it bounds."""

    model_config = SettingsConfigDict(
        env_prefix="AICC_",
        extra="forbid",
        validate_default=True,
        frozen=True,
        env_nested_delimiter="__",
    )

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address the HTTP server binds to."""

    port: int = Field(default=8080, ge=0, le=65535)
    """TCP port the HTTP server listens on (0 picks a free port)."""

    model: str = Field(default="gemma-3-270m-q4_k_m", min_length=1)
    """Model to serve: a name from `aicc models list` or a path to a GGUF file."""

    served_model_name: str | None = Field(default=None, min_length=1, max_length=256)
    """Name clients use in the `model` field; defaults to the model's own name."""

    model_dir: Path = Field(default_factory=default_model_dir)
    """Directory holding model files; the bundled model is assembled here on first use."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Where the weights run: `cpu`, or `cuda` (all layers offloaded to the GPU)."""

    threads: int = Field(default_factory=default_threads, ge=1, le=1024)
    """CPU threads llama.cpp uses for decoding and prompt processing."""

    max_batch_size: int = Field(default=32, ge=1, le=256)
    """Most sequences decoded together in one engine step (continuous batching width)."""

    max_batch_tokens: int = Field(default=128, ge=16, le=65536)
    """Most tokens (decode + prefill chunks) one engine step carries. Small steps on CPU: a
    burst of prompts is prefilled in several groups, so the first groups start streaming
    early (median TTFT), running streams are never held up long, and prefill speed per token
    is about the same as with larger chunks (measured on 2 cores: 1,891 tokens in ~8 s at 128
    and at 512)."""

    ctx_size: int = Field(default=8192, ge=256, le=1048576)
    """KV cache cells shared by all running sequences; also caps one request's context."""

    max_queue: int = Field(default=256, ge=0, le=100000)
    """Requests that may wait for a batch slot; beyond this the API answers 429."""

    batch_invariant: bool = False
    """Deterministic mode: a request's output (greedy, or seeded) is bit-identical alone or in a
    busy batch. Costs throughput: sequences still interleave step by step, but each is decoded
    in a call of its own (no shared matmuls), and each slot gets its own KV stream of
    ctx_size / max_batch_size cells, which also caps one request's context."""

    prefix_cache: bool = True
    """Keep finished requests' prompt KV and reuse it for later prompts that start with the same
    tokens (a shared system prompt, the earlier turns of a chat): only the new tokens are
    computed. Prompts are kept, not answers: every cached cell is attended (masked) by every
    decode in llama.cpp's unified cache. Evicted least-recently-used when the KV budget needs
    room."""

    prefix_cache_entries: int = Field(default=32, ge=0, le=224)
    """Most finished prefixes kept in the KV cache at once."""

    prefix_cache_scope: Literal["tenant", "global"] = "tenant"
    """`tenant`: a request reuses only prefixes cached by the same tenant (API key), so the
    speed of a cache hit cannot reveal another tenant's prompts (CVE-2025-46570's class).
    `global`: any request reuses any prefix — faster for shared system prompts across tenants,
    safe only when all callers trust each other."""

    max_n: int = Field(default=8, ge=1, le=128)
    """Most choices (`n`) one request may ask for; they share the prompt's KV cache."""

    reasoning_parser: Literal["auto", "deepseek_r1", "none"] = "auto"
    """Split `<think>…</think>` reasoning into `reasoning_content` (as DeepSeek's API does):
    `auto` when the model's chat template uses `<think>`, `deepseek_r1` always, `none` never."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3)
    """Largest request body accepted; larger bodies get 413."""

    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    """Longest a client may take to send a request's headers, counted from the connection's
    start (or the first byte of the next request on a kept-alive connection); then 408 and
    the connection is closed. Cuts slowloris clients off before a request exists."""

    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Longest the request body may stall between two pieces; then 408 and the connection is
    closed. The body is read before any route runs: a slow upload holds no engine slot."""

    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024**2)
    """Largest request line + headers accepted; larger get 431 and the connection is closed."""

    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Most open connections (or requests in progress); requests beyond it get 503."""

    keep_alive_s: float = Field(default=5.0, gt=0, le=3600)
    """How long an idle kept-alive connection waits for its next request before it is closed."""

    embedding_ctx_size: int = Field(default=2048, ge=64, le=1048576)
    """Longest input `/v1/embeddings` accepts, in tokens (capped by the model's training
    context). Its context is created on the first embeddings request, beside the chat one."""

    max_stop_strings: int = Field(default=4, ge=0, le=64)
    """Most stop strings one request may give."""

    request_timeout_s: float = Field(default=600.0, gt=0, le=86400)
    """Longest a generation may run before it is aborted and its KV freed."""

    retry_after_s: int = Field(default=1, ge=1, le=3600)
    """Seconds sent in `Retry-After` when the queue is full."""

    drain_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    """On SIGTERM: how long in-flight requests and streams may run before the server exits.
    Orchestrators must allow more (Kubernetes: terminationGracePeriodSeconds > this)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Server log verbosity."""

    # -- engine workers ----------------------------------------------------------------------
    role: Literal["gateway", "engine"] = "gateway"
    """`gateway`: the full server (users, audit, quotas; the engine in-process or in workers).
    `engine`: an engine-only worker for a gateway on the same machine — loopback only, no
    users or audit of its own, one internal bearer token (`AICC_WORKER_TOKEN`)."""

    workers: int = Field(default=0, ge=0, le=64)
    """Engine worker processes the gateway starts and supervises on this machine, `threads`
    split among them (0: the engine runs in the gateway's process)."""

    worker_start_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    """Longest a worker may take to load its model and answer /readyz; then it is killed
    and started again."""

    worker_restart_max_s: float = Field(default=30.0, ge=1, le=3600)
    """Longest wait before restarting a crashed worker: 1 s after the first crash, doubling
    after each further one up to this; a worker that stayed up this long starts over at 1 s."""

    # -- deployments (router) ----------------------------------------------------------------
    deployments: list[DeploymentSettings] = Field(default_factory=list, max_length=256)
    """Public model names served by weighted variants of local or remote replicas
    (docs/deployments.md)."""

    health_check_s: float = Field(default=2.0, gt=0, le=3600)
    """How often remote replicas are checked (GET /readyz); an ejected one returns when a
    check passes."""

    replica_eject_s: float = Field(default=10.0, gt=0, le=3600)
    """How long a replica that failed 3 requests or checks in a row is first taken out of
    service (each further ejection doubles it, up to 5 minutes)."""

    feedback_window_s: int = Field(default=7 * 86400, ge=60, le=365 * 86400)
    """How long after a call its caller may rate it (`POST /v1/feedback`); the call is found
    in the audit log, so a window beyond `audit_retention_days` finds nothing older."""

    # -- model store -------------------------------------------------------------------------
    hf_endpoint: str = Field(default="https://huggingface.co", pattern=r"^https?://")
    """Hugging Face-compatible endpoint `aicc models pull` downloads from (a mirror, ModelScope)."""

    model_encrypt: bool = False
    """Encrypt pulled and imported models at rest (AES-256-GCM); loading decrypts in memory."""

    model_key_file: Path | None = None
    """32-byte model encryption key (64 hex characters) in a file (mode 0600)."""

    model_key_env: str = Field(default="AICC_MODEL_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable that holds the model key (64 hex characters) when no file is set."""

    model_key_command: str | None = Field(default=None, min_length=1)
    """Command printing the model key (64 hex characters) on stdout: a KMS or HSM client."""

    max_loaded_models: int = Field(default=2, ge=1, le=64)
    """Most models loaded at once, the configured `model` included (it always stays). Another
    registered model is loaded on its first request; when the limit is reached the least
    recently used idle one is unloaded first (none idle: 503 with Retry-After). Each loaded
    model holds its weights and a KV cache of `ctx_size` cells. 1: only the configured model."""

    model_poll_s: float = Field(default=2.0, gt=0, le=3600)
    """How often the server checks the model registry: models added (`aicc models pull`,
    `import`, `quantize`) become listed and usable, removed ones are unloaded once idle."""

    # -- state and identity ------------------------------------------------------------------
    state_dir: Path = Field(default_factory=default_state_dir)
    """The database (SQLite by default) and the generated server secret live here."""

    database_url: str | None = Field(default=None, min_length=1, max_length=4096)
    """SQLAlchemy URL of the state database, e.g. ``postgresql+psycopg://aicc@db/aicc``.
    Default: SQLite at ``<state_dir>/aicc.db``."""

    secret_key: SecretStr | None = Field(default=None)
    """Server secret for keyed hashes of API keys and session tokens (≥ 32 characters). Default:
    ``<state_dir>/secret.key``, created with mode 0600 on first start. Every gateway sharing a
    database must share it."""

    admin_key: SecretStr | None = Field(default=None)
    """API key given to the ``admin`` user created on an empty database (`AICC_ADMIN_KEY`);
    without it a random key is printed once."""

    auth_cache_s: float = Field(default=1.0, ge=0.0, le=2.0)
    """How long a resolved credential is trusted before the database is asked again: a key
    revoked on another gateway stops working within this time (at once on this one)."""

    session_ttl_s: int = Field(default=12 * 3600, ge=60, le=30 * 86400)
    """Lifetime of a login session token."""

    password_min_length: int = Field(default=12, ge=8, le=256)
    """Shortest local password accepted."""

    lockout_threshold: int = Field(default=5, ge=1, le=100)
    """Failed logins in a row that lock a user out."""

    lockout_s: int = Field(default=900, ge=1, le=86400)
    """How long a locked-out user must wait."""

    mfa_required: bool = False
    """Require a TOTP second factor at login for users holding the admin, security or auditor
    role (MLPS 2.0 level 3); such users must enrol before they can log in with a password."""

    ldap: LdapSettings | None = None
    """LDAP / Active Directory login; off when absent."""

    # -- audit, metrics, logs ------------------------------------------------------------------
    audit_enabled: bool = True
    """Record every API call in the hash-chained audit log."""

    audit_retention_days: int = Field(default=180, ge=1, le=36500)
    """Audit entries older than this are purged daily (below 180 needs audit_retention_force)."""

    audit_retention_force: bool = False
    """Allow an audit retention shorter than 180 days."""

    audit_checkpoint_every: int = Field(default=1000, ge=1, le=10_000_000)
    """Entries between HMAC-signed checkpoints of the chain head."""

    audit_fsync: bool = False
    """SQLite: flush every audit commit to disk, so acknowledged entries survive a power loss
    too (a process crash loses none either way: WAL). Costs one disk flush per batch of
    entries (≈ 17 ms on a cloud disk, which caps a 32-client load near 700 audited req/s)."""

    audit_capture_content: bool = False
    """Also store prompts and completions in the audit log, AES-256-GCM-encrypted."""

    audit_content_key_file: Path | None = None
    """32-byte key (64 hex characters) for captured content; else AICC_AUDIT_CONTENT_KEY."""

    audit_admin_read: bool = False
    """Let the admin role read the audit log too (read-only); by default only auditors."""

    metrics_enabled: bool = True
    """Export Prometheus metrics."""

    metrics_public: bool = False
    """Serve `GET /metrics` on the main port without a credential."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve /metrics (no credential) on this port of `metrics_host`."""

    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    """Address of the separate metrics port."""

    log_format: Literal["json", "text"] = "json"
    """`json`: one object per line (ELK, Loki); `text`: for people at a terminal."""

    # -- TLS -----------------------------------------------------------------------------------
    tls_cert: Path | None = None
    """PEM server certificate (chain); with `tls_key` the server speaks HTTPS, TLS 1.3 only."""

    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."""

    @model_validator(mode="after")
    def _check_consistent(self) -> Settings:
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least "
                f"max_batch_size ({self.max_batch_size}): every running sequence decodes "
                "one token per step"
            )
        if self.max_batch_size + self.prefix_cache_entries > 256:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) + prefix_cache_entries "
                f"({self.prefix_cache_entries}) must be at most 256 (llama.cpp's sequence limit)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.audit_retention_days < 180 and not self.audit_retention_force:
            raise ValueError(
                f"audit_retention_days={self.audit_retention_days} is below the 180 days "
                "required; set audit_retention_force: true to allow it"
            )
        if self.role == "engine" and self.workers:
            raise ValueError(
                f"workers={self.workers} needs role gateway: an engine worker runs no workers"
            )
        check_unique(self.deployments)
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) < 32:
            raise ValueError("secret_key must be at least 32 characters")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'aicc.db'}"

    @property
    def num_prefix_slots(self) -> int:
        """llama.cpp sequence ids for shared prefixes: cached ones, plus one per running
        request so that `n` choices can always share their prompt. None in deterministic mode,
        where each sequence keeps a KV stream of its own."""
        if self.batch_invariant:
            return 0
        wanted = self.max_batch_size + (self.prefix_cache_entries if self.prefix_cache else 0)
        return min(wanted, 256 - self.max_batch_size)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; raise `ConfigError` naming each bad value.

    ``overrides`` are command-line flags; a value of None means "not given".
    """
    config_file = config_file or _env_config_file()
    flags = {key: value for key, value in overrides.items() if value is not None}
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {str(config_file)!r} does not exist")
        file_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})
        settings_cls = type("FileSettings", (Settings,), {"model_config": file_config})
    try:
        return settings_cls(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except (ValueError, yaml.YAMLError) as exc:  # a YAML file that does not parse
        raise ConfigError(f"config file {str(config_file)!r} is not valid YAML: {exc}") from None


def _env_config_file() -> Path | None:
    value = os.environ.get("AICC_CONFIG")
    return Path(value) if value else None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r}")
        elif "input" in error and isinstance(error["input"], dict | list) and error["loc"]:
            # A whole section (a deployment): its values may hold secrets, name it only.
            lines.append(f"invalid setting {name}: {error['msg']}")
        elif "input" in error and error["loc"]:
            lines.append(f"invalid setting {name}={error['input']}: {error['msg']}")
        else:
            lines.append(f"invalid settings: {error['msg']}")
    return "; ".join(lines)
