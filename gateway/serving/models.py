"""GET /v1/models and /v1/models/{model}: the model names some ready replica serves now."""

from __future__ import annotations

from .. import protocol as p
from ..auth.projects import ALLOW_ALL, ModelAccess
from ..routing import Router, Target


def model_card(t: Target) -> p.ModelCard:
    """A deployment's base model (root: its model version) or one of its adapters (parent: the base)."""
    parent = t.model.rsplit(":", 1)[0] if t.adapter else None
    return p.ModelCard(id=t.model, created=t.created, root=t.model_version, parent=parent)


class ServingModels:
    """Reads the routing table only: no quota, no call to a replica."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def list(self, access: ModelAccess = ALLOW_ALL) -> p.ModelList:
        """The ready models the caller's project may use."""
        return p.ModelList(data=[model_card(t) for t in self.router.models() if access.allows(t.model)])

    async def get(self, model: str, access: ModelAccess = ALLOW_ALL) -> p.ModelCard:
        """404 when the project may not use ``model`` or no replica knows it (the same answer), 503
        when it is known but ready nowhere."""
        access.check(model)
        await self.router.resolve(model)
        _, target = self.router.pick(model)
        return model_card(target)
