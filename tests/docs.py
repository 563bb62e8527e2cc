"""The manual, as the doc-check tests read it: one place that knows where each kind of fact is documented.

Config keys are documented in docs/configuration.md, metrics in the reference table of docs/metrics.md,
the IAM statements and the unit's security score in docs/install.md, and commands anywhere in the
README or docs/ (docs/cli.md lists them all). A test that checks "is X documented" asks here, so moving
a page means changing this file, not every test.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def pages() -> List[Path]:
    """README.md and every page under docs/, in a stable order."""
    found = sorted(DOCS.glob("*.md"))
    assert found, f"no documentation pages under {DOCS}"
    return [ROOT / "README.md"] + found


def page(name: str) -> str:
    """One page of docs/ by file name, e.g. ``page("metrics.md")``; a missing page fails loudly."""
    path = DOCS / name
    assert path.is_file(), f"docs/{name} is missing"
    return path.read_text(encoding="utf-8")


def all_text() -> str:
    """The README and every docs/ page, joined: for facts that may be documented on any page."""
    return "\n".join(p.read_text(encoding="utf-8") for p in pages())


def configuration() -> str:
    """The configuration reference: every config key with its default."""
    return page("configuration.md")


def metrics_reference() -> str:
    """The metrics page, whose reference table lists every exported metric with its type and labels."""
    return page("metrics.md")


def install() -> str:
    """Install and operations: packaging, the units, the IAM policy."""
    return page("install.md")


def config_defaults() -> Dict[str, str]:
    """Each key's default cell in docs/configuration.md's tables, by full key path (``volumes.create.type``).

    A table's rows belong to the section heading above it (``## `[drain.workload]` ``, or
    ``### `gang` (in `[[checkpoints]]`)``); a row may spell its full path (``volumes.mount``) or only the leaf.
    """
    rows: Dict[str, str] = {}
    section = ""
    for line in configuration().splitlines():
        heading = re.match(r"^#{2,6} `\[*([A-Za-z0-9_.]+)\]*`(?: \(in `\[*([A-Za-z0-9_.]+)\]*`\))?", line)
        if heading:
            name, parent = heading.group(1), heading.group(2)
            section = f"{parent}.{name}" if parent else name
            continue
        row = re.match(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|([^|]*)\|", line)
        if row and section:
            key = row.group(1)
            full = key if key.split(".")[0] == section.split(".")[0] and "." in key else f"{section}.{key}"
            rows.setdefault(full, row.group(2).strip())
    return rows
