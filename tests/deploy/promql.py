"""The metric and label names a PromQL expression uses, for checking them against what the service exports.

Not a PromQL parser (promtool checks the syntax, see test_monitoring.py): strings, label matchers, ranges
and grouping clauses are blanked out, and what is left that is a name and not a function call, an
operator keyword or a number is a metric name. Our dashboard's and rules' expressions are all of that form.
"""

from __future__ import annotations

import re

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "Inf", "NaN", "atan2"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def metric_names(expr: str) -> set[str]:
    text = _strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if match.group() in KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """metric -> label names in its selector's matchers (`ldm_x{model=~"a", status="5.."}` -> model, status)."""
    out: dict[str, set[str]] = {}
    for metric, body in SELECTOR.findall(_strip_strings(expr)):
        out.setdefault(metric, set()).update(MATCHER.findall(body))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names in by / without / on / ignoring / group_left / group_right clauses."""
    return {label.strip() for _, labels in GROUPING.findall(expr) for label in labels.split(",") if label.strip()}
