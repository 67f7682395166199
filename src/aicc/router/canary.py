"""Automatic rollback: a canary that does clearly worse than its baseline over a window goes
back to weight 0 (logged, audited as `deploy.rollback`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aicc.errors import InvalidRequestError, ModelNotFoundError
from aicc.router.build import rollback_monitor

if TYPE_CHECKING:
    from aicc.router.service import Deployment, Router

logger = logging.getLogger(__name__)

ROLLBACK_EVERY_S = 2.0
AUTO_ROLLBACK_ACTOR = "auto-rollback"


async def watch_canaries(router: Router) -> None:
    """Every `ROLLBACK_EVERY_S`: roll back each canary that does clearly worse than its baseline."""
    while True:
        await asyncio.sleep(ROLLBACK_EVERY_S)
        for model, deployment in list(router.deployments.items()):
            if router.deployments.get(model) is deployment:  # not replaced meanwhile
                await _judge(router, model, deployment)


async def _judge(router: Router, model: str, deployment: Deployment) -> None:
    config = deployment.settings
    if config is None or config.auto_rollback is None or deployment.monitor is None:
        return
    settings = config.auto_rollback
    if deployment.spec.variant(settings.canary).weight <= 0:
        return  # nothing to roll back
    reason = deployment.monitor.verdict(settings.canary, settings.baseline)
    if reason is None:
        return
    logger.warning("rolling %s back to %s: %s", model, settings.baseline, reason)
    try:
        await router.rollback(model, settings.baseline, actor=AUTO_ROLLBACK_ACTOR)
    except (ModelNotFoundError, InvalidRequestError):  # replaced or removed meanwhile
        return
    deployment.monitor = rollback_monitor(config)
    if router.audit_event is not None:
        detail = {"model": model, "variant": settings.baseline, "canary": settings.canary,
                  "reason": reason}  # fmt: skip
        try:
            await router.audit_event("deploy.rollback", None, detail)
        except Exception:  # the rollback stands; a lost entry must be seen in the log
            logger.exception("the audit entry of the rollback of %s was not written", model)
