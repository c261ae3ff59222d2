"""How every benchmark hands over its figures: the table on stdout, table and data as JSON under results/."""

import json
from pathlib import Path
from typing import Any


def publish(data: dict[str, Any], table: str, out: Path) -> None:
    print(table)
    data["table_markdown"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten: {out}")
