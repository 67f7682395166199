"""Deployment settings: public model names, their weighted variants and the replicas behind them.

Validated when the settings load: names and weights through the router's own specs, so a bad
deployment stops start-up with a message naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, model_validator

from aicc.errors import InvalidRequestError
from aicc.router.policy import DeploymentSpec, VariantSpec

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

_LITERAL_KEY_CONTEXT = "literal_api_key"
"""Set in the validation context of a deployment sent to the admin API (`from_api`): only
there may a replica carry a literal `api_key` (stored encrypted)."""


class ReplicaTimeouts(BaseModel):
    """How long the gateway waits for a remote replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_s: float = Field(default=5.0, gt=0, le=600)
    first_byte_s: float = Field(default=60.0, gt=0, le=86400)
    """Streams: from sending the request to the first event."""
    idle_s: float = Field(default=60.0, gt=0, le=86400)
    """Longest gap between two reads of the answer."""
    total_s: float = Field(default=600.0, gt=0, le=86400)
    check_s: float = Field(default=5.0, gt=0, le=600)
    """For active health checks."""


class ReplicaSettings(BaseModel):
    """`{local: MODEL_REF}` (served in-process) or `{url: ...}` (a remote OpenAI server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: str | None = Field(default=None, min_length=1, max_length=256)
    """A model this gateway serves in-process (its served name or a registry ref)."""
    url: str | None = Field(default=None, min_length=1, max_length=2048)
    """Base URL of a remote aicc or OpenAI-compatible server (`https://host:8000`)."""
    model: str | None = Field(default=None, min_length=1, max_length=256)
    """The model name the upstream serves; default the deployment's public name."""
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
    """Environment variable holding the upstream's API key."""
    api_key_file: Path | None = None
    """File holding the upstream's API key (never a literal key in the config)."""
    api_key: SecretStr | None = Field(default=None, min_length=1, max_length=4096)
    """The upstream's key itself: admin API only (`DeploymentSettings.from_api`), stored
    encrypted."""
    ca_file: Path | None = None
    """CA bundle verifying the upstream's TLS certificate (default: the system CAs)."""
    max_inflight: int = Field(default=64, ge=1, le=100_000)
    """Requests the replica may have outstanding; a full replica is skipped."""
    timeouts: ReplicaTimeouts = Field(default_factory=ReplicaTimeouts)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_key(cls, data: Any, info: ValidationInfo) -> Any:
        is_api = isinstance(info.context, dict) and info.context.get(_LITERAL_KEY_CONTEXT) is True
        if not isinstance(data, dict):
            return data
        # A dump of the settings (workers get one) carries `api_key: null`: not a key.
        if data.get("api_key") is not None and not is_api:
            raise ValueError(
                "api_key: a literal key is not allowed in the config; "
                "use api_key_env or api_key_file"
            )
        server_side = [k for k in ("api_key_env", "api_key_file") if data.get(k) is not None]
        if server_side and is_api:
            # They would read the server's environment or files and send them to the URL.
            raise ValueError(
                f"{server_side[0]}: through the API a replica's key is given as api_key "
                "(stored encrypted); variables and files of the server are for its config"
            )
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> ReplicaSettings:
        if (self.local is None) == (self.url is None):
            raise ValueError("a replica needs exactly one of `local` or `url`")
        if self.local is not None:
            remote_only = [
                name
                for name in ("model", "api_key", "api_key_env", "api_key_file", "ca_file")
                if getattr(self, name) is not None
            ]
            if remote_only:
                raise ValueError(f"a local replica takes no {', '.join(remote_only)}")
        sources = [
            name
            for name in ("api_key", "api_key_env", "api_key_file")
            if getattr(self, name) is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"give one of {' or '.join(sources)}, not several")
        return self


class VariantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    weight: float = Field(ge=0)
    """Share of traffic relative to the other variants (0: only `X-AICC-Variant` overrides)."""
    replicas: list[ReplicaSettings] = Field(min_length=1, max_length=256)


class AutoRollbackSettings(BaseModel):
    """Roll the canary back to the baseline when it does clearly worse over a window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: str = Field(min_length=1)
    canary: str = Field(min_length=1)
    window_s: float = Field(default=60.0, gt=0, le=86400)
    min_requests: int = Field(default=20, ge=1, le=100_000)
    """Requests each variant needs in the window before a verdict."""
    max_error_rate_delta: float = Field(default=0.05, ge=0, lt=1)
    """How much higher (a fraction: 0.05 is five points) the canary's error rate may be."""
    max_p99_ratio: float = Field(default=2.0, ge=1)
    """How many times the baseline's p99 latency the canary's may be."""


class DeploymentSettings(BaseModel):
    """A public model name served by weighted variants (A/B tests, canaries)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    """The name clients put in `model`."""
    sticky: Literal["none", "user", "header"] = "none"
    """`user`: a caller keeps their variant; `header`: the `sticky_header` value decides."""
    sticky_header: str = Field(default="x-aicc-session", min_length=1, max_length=128)
    variants: list[VariantSettings] = Field(min_length=1, max_length=32)
    fallback: list[ReplicaSettings] = Field(default_factory=list, max_length=256)
    """Replicas used when no replica of the chosen variant is available (hybrid failover)."""
    auto_rollback: AutoRollbackSettings | None = None

    @model_validator(mode="after")
    def _check_spec(self) -> DeploymentSettings:
        try:
            spec = self.spec()
        except InvalidRequestError as exc:
            raise ValueError(exc.message) from None
        rollback = self.auto_rollback
        if rollback is not None:
            for name in (rollback.baseline, rollback.canary):
                if name not in {variant.name for variant in spec.variants}:
                    raise ValueError(f"auto_rollback names no variant of this deployment: {name!r}")
            if rollback.baseline == rollback.canary:
                raise ValueError("auto_rollback: baseline and canary must differ")
        return self

    @classmethod
    def from_api(cls, data: Any) -> DeploymentSettings:
        """Validate a deployment sent to the admin API (or stored from there), where a replica
        may carry a literal `api_key`. Raises `ValidationError`."""
        return cls.model_validate(data, context={_LITERAL_KEY_CONTEXT: True})

    def spec(self) -> DeploymentSpec:
        """The routing spec with the configured weights. Raises `InvalidRequestError`."""
        variants = tuple(
            VariantSpec(
                variant.name,
                variant.weight,
                tuple(replica_id(self.model, replica) for replica in variant.replicas),
            )
            for variant in self.variants
        )
        return DeploymentSpec(self.model, variants, self.sticky, self.sticky_header.lower())


def replica_id(public_model: str, replica: ReplicaSettings) -> str:
    """A replica's id: `local:<model>`, or `<url>#<upstream model>`."""
    if replica.local is not None:
        return f"local:{replica.local}"
    return f"{(replica.url or '').rstrip('/')}#{replica.model or public_model}"


def replica_settings(deployment: DeploymentSettings) -> list[tuple[str, ReplicaSettings]]:
    """Every replica of the deployment (variants, then fallback) with its id, first use only."""
    found: dict[str, ReplicaSettings] = {}
    for replica in [r for v in deployment.variants for r in v.replicas] + deployment.fallback:
        found.setdefault(replica_id(deployment.model, replica), replica)
    return list(found.items())


def check_unique(deployments: list[DeploymentSettings]) -> None:
    """Raise `ValueError` when two deployments share a public name."""
    names = [deployment.model for deployment in deployments]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"deployments: model {duplicates[0]!r} is configured twice")
