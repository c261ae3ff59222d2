"""Read the deployment files the way their tools do: the Dockerfile's stages and instructions, Compose files
with Compose's own YAML tags and merge of an override file, .dockerignore's patterns, and the effective
environment of a container (image ENV, then Compose `environment` or Kubernetes `envFrom` and `env`)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ldm-serve.json"


# ------------------------------------------------------------------------------------------------ Dockerfile

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD arguments, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3:] if "CMD" in text else ""
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs, later ones winning; `$PATH`-style references are left as written."""
        out: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                key, _, value = token.partition("=")
                out[key] = value
        return out

    def exposed(self) -> set[int]:
        return {int(p.split("/")[0]) for i in self.all("EXPOSE") for p in i.args.split()}

    def copies(self) -> list[tuple[list[str], str, bool]]:
        """(sources, destination, from another stage) of each COPY."""
        out = []
        for instruction in self.all("COPY"):
            words = instruction.args.split()
            from_stage = any(w.startswith("--from=") for w in words)
            paths = [w for w in words if not w.startswith("--")]
            out.append((paths[:-1], paths[-1], from_stage))
        return out


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Instructions with their `\\` continuations joined, comments and blank lines dropped."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def stage(name: str) -> Stage:
    return next(s for s in dockerfile_stages() if s.name == name)


# ------------------------------------------------------------------------------------------------ .dockerignore

def _pattern(glob: str) -> re.Pattern[str]:
    """Docker's .dockerignore globs (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    glob = glob.strip("/")
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(relative: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    """Whether the build context leaves out `relative` (a path from the repository root), by Docker's rules:
    the last pattern that matches the path or one of its parent folders decides; `!` lets a path back in."""
    rules = [line.strip() for line in ignore_file.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _pattern(rule[1:] if negate else rule)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# ------------------------------------------------------------------------------------------------ Compose

@dataclass(frozen=True)
class Tagged:
    """A value under one of Compose's merge tags: `!reset` (drop it) or `!override` (replace, not merge)."""

    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: anchors and `<<` merges, and its `!reset` / `!override` tags."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_compose(path: Path) -> dict[str, Any]:
    return dict(yaml.load(path.read_text(), Loader=ComposeLoader))  # a SafeLoader subclass: no arbitrary objects


def plain(node: Any) -> Any:
    """The document as a single file: tagged values are just their values."""
    if isinstance(node, Tagged):
        return plain(node.value)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def merge(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override`, for what our override uses: mappings merge key by key, other
    values replace, `!reset` removes the key, `!override` replaces a mapping whole. (Compose also merges
    some sequences, ports and volumes; the CPU override has none, and a test says so.)"""
    if isinstance(override, Tagged):
        return override
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                out.pop(key, None)
            elif isinstance(value, Tagged):
                out[key] = plain(value.value)
            else:
                out[key] = merge(base.get(key), value) if key in base else plain(value)
        return out
    return plain(override)


# ------------------------------------------------------------------------------------------------ containers

SECRET = "<from a Secret>"


def k8s_container_env(container: dict[str, Any], config_maps: dict[str, dict[str, str]],
                      image_env: dict[str, str]) -> dict[str, str]:
    """What a Kubernetes container's process sees: the image's ENV, then `envFrom` ConfigMaps, then `env`
    (a Secret's value as a placeholder; `$(NAME)` expanded from earlier variables, as the kubelet does)."""
    env = dict(image_env)
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        else:
            env[item["name"]] = SECRET
    return env


# ------------------------------------------------------------------------------------------------ compose variables

_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\})")


class MissingVariable(ValueError):
    """A `${NAME:?message}` (or `${NAME?message}`) whose variable is unset: compose stops with the message."""


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over a loaded document, as `docker compose config` does it: `${NAME}`,
    `${NAME:-default}` (unset or empty), `${NAME-default}` (unset), `${NAME:?error}` / `${NAME?error}`, `$$`."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(match: re.Match[str]) -> str:
        dollar, name, operator, argument = match.groups()
        if dollar:
            return "$"
        value = env.get(name)
        missing = value is None or (operator is not None and operator.startswith(":") and value == "")
        if operator in (":-", "-") and missing:
            return str(argument)
        if operator in (":?", "?") and missing:
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        return value or ""

    return _VARIABLE.sub(one, node)
