"""The README and its docs/ pages document every knob, metric and command the code has (read from the code, not a
copied list), and every page or file the README links to exists."""

import re
from pathlib import Path

from service.cli import build_parser
from service.config import Settings
from service.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PAGES = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
DOCUMENTED = README + "\n".join(PAGES.values())
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_setting_is_documented() -> None:
    missing = [f"LDM_{name.upper()}" for name in Settings.model_fields if f"LDM_{name.upper()}" not in DOCUMENTED]
    assert not missing


def test_every_setting_is_in_the_settings_table() -> None:
    rows = set(re.findall(r"^\| `(LDM_[A-Z0-9_]+)` \|", PAGES["settings.md"], re.MULTILINE))
    assert rows == {f"LDM_{name.upper()}" for name in Settings.model_fields}


def test_every_metric_is_documented() -> None:
    missing = [m.name for m in METRICS if m.name not in PAGES["metrics.md"]]
    assert not missing


def test_every_command_is_documented() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    missing = [c for c in commands if f"ldm {c}" not in DOCUMENTED]
    assert not missing


def test_every_local_link_of_the_readme_and_the_docs_exists() -> None:
    """README links resolve from the root, a docs page's from docs/; web links are not followed."""
    broken = []
    for where, text in [(ROOT, README), *((ROOT / "docs", text) for text in PAGES.values())]:
        for target in LINK.findall(text):
            if not target.startswith(("http://", "https://")) and not (where / target).exists():
                broken.append(f"{where.name}: {target}")
    assert not broken


def test_the_readme_links_every_docs_page_and_stays_short() -> None:
    linked = {Path(t).name for t in LINK.findall(README) if t.startswith("docs/")}
    assert set(PAGES) - linked == set()
    assert len(README.splitlines()) < 150  # a newcomer's two minutes; the reference lives in docs/


def test_the_pictures_are_small() -> None:
    pictures = [p for p in LINK.findall(README) if p.endswith(".png")]
    assert len(pictures) >= 6  # the five shipped models' grids and the playground
    assert all((ROOT / p).stat().st_size < 200_000 for p in pictures)
