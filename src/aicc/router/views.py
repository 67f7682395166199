"""The admin API's view of the router's deployments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aicc.router.service import Deployment, Router


def deployment_view(router: Router, deployment: Deployment) -> dict[str, Any]:
    """A deployment as the admin API shows it: weights, replica health and load (no keys)."""
    spec = deployment.spec

    def replica_view(rid: str) -> dict[str, Any]:
        status = router.health.status(rid)
        replica = router.replicas[rid]
        kind = "worker" if rid in router.fleet.supervised else "remote"
        return {
            "id": rid,
            "kind": "local" if replica.local_model is not None else kind,
            "available": router.is_in_service(rid),
            "consecutive_failures": status.num_consecutive_failures,
            "ejections": status.num_ejections,
            "outstanding": router.outstanding.num_outstanding(rid),
            "max_inflight": replica.max_inflight,
        }

    return {
        "model": spec.model,
        "source": deployment.source,
        "sticky": spec.sticky,
        "variants": [
            {
                "name": v.name,
                "weight": v.weight,
                "replicas": [replica_view(r) for r in v.replicas],
            }
            for v in spec.variants
        ],
        "fallback": [replica_view(rid) for rid in deployment.fallback],
        "auto_rollback": (
            deployment.settings.auto_rollback.model_dump()
            if deployment.settings and deployment.settings.auto_rollback
            else None
        ),
    }
