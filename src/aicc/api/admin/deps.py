"""How /auth and /admin routes reach the identity service: off the event loop, and with the
credential cache cleared after every change that can narrow someone's access."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from aicc.auth.permissions import ungrantable
from aicc.auth.principal import Principal
from aicc.auth.resolver import CredentialResolver
from aicc.auth.service import IdentityService
from aicc.errors import EngineUnavailableError, PermissionDeniedError

T = TypeVar("T")


class Identity:
    """The identity service as routes use it."""

    def __init__(self, service: IdentityService, resolver: CredentialResolver) -> None:
        self.service = service
        self.resolver = resolver

    async def read(self, work: Callable[..., T], *args: object, **kwargs: object) -> T:
        return await asyncio.to_thread(work, *args, **kwargs)

    async def change(self, work: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a change, then forget cached principals (it may revoke or narrow one)."""
        try:
            return await asyncio.to_thread(work, *args, **kwargs)
        finally:
            self.resolver.invalidate()

    async def check_grant(
        self, actor: Principal, *, roles: Iterable[str] = (), permissions: Iterable[str] = ()
    ) -> None:
        """Refuse to hand out permissions the actor does not hold (see `FREELY_GRANTED`).
        Raises PermissionDeniedError, NotFoundError (an unknown role)."""
        granted = set(permissions)
        for name in roles:
            granted |= set((await self.read(self.service.get_role, name)).permissions)
        refused = ungrantable(granted, actor.permissions)
        if refused:
            raise PermissionDeniedError(
                f"you cannot grant {', '.join(refused)}: only holders of a permission may grant it"
            )


async def get_identity(request: Request) -> Identity:
    identity: Identity | None = getattr(request.app.state, "identity", None)
    if identity is None:
        raise EngineUnavailableError("the server is starting; retry shortly")
    return identity


IdentityDep = Annotated[Identity, Depends(get_identity)]
