"""The web console's static files are package data: every file under api/ui/static is matched by a glob in
pyproject.toml's `[tool.setuptools.package-data]` (a file no glob covers would be missing from the wheel), and
the page's module imports all resolve to files that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from api.routes.ui import STATIC_DIR

ROOT = Path(__file__).resolve().parents[3]


def test_every_console_file_is_package_data() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = STATIC_DIR.parent
    covered = {path for pattern in package_data["api.ui"] for path in package_dir.glob(pattern)}
    files = {path for path in STATIC_DIR.rglob("*") if path.is_file()}
    assert files and files <= covered, sorted(str(path.relative_to(package_dir)) for path in files - covered)


def test_every_module_import_resolves() -> None:
    scripts = list(STATIC_DIR.rglob("*.js"))
    for script in scripts:
        for target in re.findall(r'^import .* from "(\.[^"]+)";', script.read_text(), flags=re.MULTILINE):
            assert (script.parent / target).resolve().is_file(), f"{script.name} imports missing {target}"
    page = (STATIC_DIR / "index.html").read_text()
    for reference in re.findall(r'(?:src|href)="([^"#:]+)"', page):
        assert (STATIC_DIR / reference).is_file(), reference
