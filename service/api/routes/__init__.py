"""One router per resource: jobs (async), sync, openai, models, health (healthz, readyz, metrics)."""
