"""GET /v1/models: the models this service can run now, in the OpenAI list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.bodies import ModelCard, ModelList
from service.api.deps import AUTH_RESPONSES, QueueDep, SettingsDep, get_principal
from service.api.submit import served_models

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_principal)], responses=AUTH_RESPONSES)


@router.get("/models", response_model=ModelList, summary="List models")
async def list_models(queue: QueueDep, settings: SettingsDep) -> ModelList:
    """Models served by live workers, plus the configured default (listed with `workers: 0` when none serves it)."""
    served = await served_models(queue, settings)
    return ModelList(data=[ModelCard(id=name, workers=count) for name, count in sorted(served.items())])
