"""The README documents every knob and every metric the code has (read from the code, not a copied list)."""

from pathlib import Path

from service.cli import build_parser
from service.config import Settings
from service.metrics import METRICS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [f"LDM_{name.upper()}" for name in Settings.model_fields if f"LDM_{name.upper()}" not in README]
    assert not missing


def test_every_metric_is_in_the_readme() -> None:
    missing = [m.name for m in METRICS if m.name not in README]
    assert not missing


def test_every_command_is_in_the_readme() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    missing = [c for c in commands if f"ldm {c}" not in README]
    assert not missing
