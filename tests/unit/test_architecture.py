"""The layering of the project, and the torch-free copies the front ends keep, checked.

Layers (docs/architecture.md, "Library layout"):
- `models` (the library) never imports `service`.
- `service.api` (the REST and gRPC front ends) never imports torch or `models`, directly or through any service
  module it imports, at module level or inside a function: the front ends start fast, hold no model, and scale
  out on machines without an accelerator.
- Among `service` modules, only those in `DEVICE_MODULES` import torch or `models`: the worker's runner (every
  served job reaches the device through it) and its step scheduler (continuous batching steps a `StepBatch`), the
  offline commands (`ldm generate`, `ldm reconstruct`, `ldm convert`, and `service.cli`, which registers
  `ldm train` and `ldm eval` and imports their work when they run), and two process-level reads in the worker:
  its torch thread count and its accelerator memory gauge.

Imports are read from the source (every `import` statement, including those inside functions and
`TYPE_CHECKING` blocks), so a lazy import cannot slip past; one run also imports the front ends for real and
looks at `sys.modules`, which catches a third-party package that pulls torch in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from hypothesis import given
from hypothesis import strategies as st

import models.names as names
from service import config as service_config
from service import schemas
from service.worker import runner

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "service")
#: service modules that may import torch or `models`, and why
DEVICE_MODULES = {
    "service.worker.runner": "the worker's runner: the only code of a served job that touches the device",
    "service.worker.continuous": "the continuous worker's step scheduler: holds the running samples' StepBatch "
                                 "(models/step_batch.py) and steps it; the runner starts, decodes and encodes them",
    "service.generate": "`ldm generate`: an offline command that runs the model in its own process",
    "service.zoo_commands": "`ldm reconstruct` / `ldm convert`: offline commands on a first stage or a zoo model",
    "service.grid": "`ldm grid`: an offline command that draws a model's images into one PNG in its own process",
    "service.cli": "the `ldm` command: registers `ldm train`/`ldm eval` (argparse and models.names only at module "
                   "level) and imports the offline commands' work when they run",
    "service.worker.process": "torch.set_num_threads for the worker process before the runner loads its model",
    "service.metrics": "the worker's accelerator memory gauge reads torch.cuda counters (imported in its collect)",
}
#: imports the front ends' closure may make although the module is reached from service.api: the edge, and why
API_IGNORED = {
    ("service.metrics", "torch"): "AcceleratorMemoryCollector, registered only in a worker's registry",
}
FORBIDDEN_IN_API = ("torch", "models")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (generated gRPC stubs included)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The dotted names a module imports anywhere in its source; `from a import b` gives `a` and `a.b`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


IMPORTS = {name: set(_imports(name, path)) for name, path in MODULES.items()}


def _top(imported: str) -> str:
    return imported.partition(".")[0]


def _project(imported: str) -> str | None:
    """The project module an import loads (the longest known prefix), None for a third-party one."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def test_every_module_is_seen() -> None:
    assert {"models.names", "models.resolve", "service.api.rest", "service.worker.runner"} <= set(MODULES)
    assert "torch" in {_top(i) for i in IMPORTS["service.worker.runner"]}  # the reader does find imports


def test_the_model_library_never_imports_the_service() -> None:
    offenders = sorted(f"{module} imports {imported}" for module, imported_names in IMPORTS.items()
                       if module.startswith("models") for imported in imported_names if _top(imported) == "service")
    assert offenders == []


def _api_closure() -> dict[str, str]:
    """Every service module the front ends load (module -> the module that imports it first), following every
    import, lazy ones included; an import of the model library is reported where it is made, not followed."""
    reached = {m: m for m in MODULES if m.startswith("service.api")}
    todo = list(reached)
    while todo:
        module = todo.pop()
        for imported in IMPORTS[module]:
            target = _project(imported)
            if target is not None and _top(target) == "service" and target not in reached:
                reached[target] = module
                todo.append(target)
    return reached


def test_the_front_ends_never_reach_torch_or_the_model_library() -> None:
    reached = _api_closure()
    offenders = []
    for module, via in sorted(reached.items()):
        for imported in sorted(IMPORTS[module]):
            top = _top(imported)
            if top in FORBIDDEN_IN_API and (module, top) not in API_IGNORED:
                offenders.append(f"{module} (reached from {via}) imports {imported}")
    assert offenders == []
    assert {module for module, _ in API_IGNORED} <= set(reached), "an ignored edge no longer exists: drop it"


def test_only_the_runner_and_the_offline_commands_touch_the_device() -> None:
    touching = {module for module, imported_names in IMPORTS.items() if module.startswith("service")
                and any(_top(i) in ("torch", "models") for i in imported_names)}
    assert touching - set(DEVICE_MODULES) == set(), "a service module imports torch or models: see the docstring"
    assert set(DEVICE_MODULES) - touching == set(), "an allowed module no longer imports torch or models: drop it"


def test_importing_the_front_ends_loads_neither_torch_nor_the_model_library() -> None:
    code = ("import sys; import service.api.rest, service.api.grpc, service.api.submit; "
            "print(sorted({m.partition('.')[0] for m in sys.modules} & {'torch', 'models'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------ the front ends' torch-free copies


def test_tasks_are_the_model_librarys() -> None:
    assert tuple(t.value for t in schemas.Task) == names.TASKS
    assert {t.value for t in schemas.CONDITION_TASKS} == set(names.CONDITION_TASKS)


def test_sampler_names_are_the_model_librarys() -> None:
    assert get_args(schemas.Sampler) == names.SAMPLERS


def test_default_guidance_is_the_model_librarys() -> None:
    assert {task.value: scale for task, scale in schemas.DEFAULT_GUIDANCE.items()} == names.DEFAULT_GUIDANCE


def test_dtype_names_are_the_model_librarys() -> None:
    setting = service_config.Settings.model_fields["worker_dtype"].annotation
    assert get_args(setting) == ("auto", *names.DTYPES)


def test_winograd_policy_names_are_the_model_librarys() -> None:
    setting = service_config.Settings.model_fields["worker_winograd"].annotation
    assert get_args(setting) == names.WINOGRAD_POLICIES


def test_gpu_mode_names_are_the_model_librarys() -> None:
    setting = service_config.Settings.model_fields["worker_gpu_mode"].annotation
    assert get_args(setting) == names.GPU_MODES


@given(st.text(alphabet=st.sampled_from("aB \t\nÉß1-"), max_size=12))
def test_class_names_match_as_in_the_model_library(name: str) -> None:
    assert schemas.normalise_name(name) == names.normalise_name(name)


def test_the_runner_calls_the_pipeline_for_every_task() -> None:
    assert {task.value for task in runner.PIPELINE_CALLS} == set(names.TASKS)
    assert set().union(*names.TASKS_BY_KIND.values()) == set(names.TASKS)
