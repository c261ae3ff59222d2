"""GET /v1/models: the models this service can run now, in the OpenAI list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.bodies import ModelCard, ModelList
from service.api.deps import AUTH_RESPONSES, QueueDep, SettingsDep, get_principal
from service.api.submit import served_models
from service.schemas import Task

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_principal)], responses=AUTH_RESPONSES)


@router.get("/models", response_model=ModelList, summary="List models")
async def list_models(queue: QueueDep, settings: SettingsDep) -> ModelList:
    """Models served by live workers, plus the configured default (listed with `workers: 0` when none serves it),
    with the tasks their workers can do, the labels they take, the guidance each task gets by default, the sampler, the
    model-specific fields they take and the refiners they hold."""
    served = await served_models(queue, settings)
    workers = await queue.workers()
    cards = []
    for name, count in sorted(served.items()):
        serving = [w for w in workers if name in w.models]
        tasks = sorted({t for w in serving for t in w.tasks}, key=list(Task).index)
        labels = next((w.labels for w in serving if w.labels is not None), None)
        guidance = next((w.default_guidance for w in serving if w.default_guidance), {})
        sampler = next((w.default_sampler for w in serving if w.default_sampler is not None), None)
        by_sampler = next((w.sampler_guidance for w in serving if w.sampler_guidance), {})
        missing = next((w.missing_null for w in serving if w.missing_null is not None), None)
        options = next((w.options for w in serving if w.options is not None), None)
        refiners = sorted({r for w in serving for r in w.refiners})
        cards.append(ModelCard(id=name, workers=count, tasks=tasks, labels=labels, default_guidance=guidance,
                               default_sampler=sampler, sampler_guidance=by_sampler, missing_null=missing,
                               options=options, refiners=refiners))
    return ModelList(data=cards)
