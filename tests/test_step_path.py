"""docs/step_path.md, the path of one training step, against the code it names.

Every row names a file that exists and symbols defined in it, the rows run from the entry point to
the file that calls the all-to-all, and they stay within eight files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+) \| `([^`]+)` \| (.+?) \| .+ \|$")


def _defined(path: Path) -> set[str]:
    """Dotted names defined in a module: top-level functions and classes, and `Class.method`."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{item.name}")
    return names


def test_every_row_names_a_file_and_symbols_that_exist_within_eight_files():
    rows = [ROW.match(line) for line in (ROOT / "docs" / "step_path.md").read_text().splitlines()]
    rows = [m for m in rows if m]
    assert [int(m.group(1)) for m in rows] == list(range(1, len(rows) + 1))
    assert 2 <= len(rows) <= 8
    files = [m.group(2) for m in rows]
    assert files[0] == "jobs/train.py" and len(set(files)) == len(files)
    for m in rows:
        path = ROOT / m.group(2)
        symbols = re.findall(r"`([A-Za-z_][\w.]*)`", m.group(3))
        assert path.is_file() and symbols, m.group(0)
        missing = set(symbols) - _defined(path)
        assert not missing, f"{m.group(2)} defines no {sorted(missing)}"
    # the last file is where the all-to-all is called
    assert "all_to_all_single(" in (ROOT / files[-1]).read_text()
