"""What the service really accepts, read from its code (never a copied list): setting names and the
`LDM_*` variables they come from, the `ldm` subcommands and their flags, the REST app's routes, and the
metrics a running process exports."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from functools import cache
from unittest import mock

from prometheus_client.parser import text_string_to_metric_families

from service.api.rest import create_app
from service.cli import build_parser
from service.config import Settings, load_settings

ENV_NAMES = frozenset(f"LDM_{name.upper()}" for name in Settings.model_fields)


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process with environment `env` builds (its `LDM_*` variables; none of this test's)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LDM_")}
    ldm = {k: v for k, v in env.items() if k.startswith("LDM_")}
    with mock.patch.dict(os.environ, {**clean, **ldm}, clear=True):
        return load_settings()


def subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    assert action.choices is not None
    return set(action.choices)


def parse_ldm(args: Sequence[str]) -> str:
    """'' when `ldm ARGS` parses (subcommand and flags exist, required ones given), else argparse's error."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(list(args))
        except SystemExit as exc:
            return err.getvalue().strip() or f"exit {exc.code}"
    return ""


@cache
def rest_paths() -> frozenset[str]:
    """Paths the REST app serves, from its OpenAPI schema (building the app connects to nothing)."""
    app = create_app(Settings(redis_url="redis://unused:6379/0"))
    return frozenset(app.openapi()["paths"])


def exported_series(text: str) -> set[str]:
    """Every series name a /metrics page exports or declares: sample names, and for each declared family the
    names its type gives it (a labelled histogram shows no sample before its first observation)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "_created")}
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names
