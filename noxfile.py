"""Sessions: `tests` (the whole suite) and `wheels` (built wheels in a fresh venv).

`bash .ci/run` runs both; `nox -s tests -- -k config` passes arguments to pytest.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["wheels", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PLUGINS = sorted(p for p in (ROOT / "plugins").glob("*/") if (p / "pyproject.toml").exists())


def _entry_points() -> dict[str, str]:
    """Every `rexcore.plugins` entry point the tree declares: name -> distribution."""
    found = {}
    for plugin in PLUGINS:
        project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
        for name in project.get("entry-points", {}).get("rexcore.plugins", {}):
            found[name] = project["name"]
    return found


def _with_testing(plugin: Path) -> str:
    """The plugin's path, with its ``testing`` extra when it declares one."""
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    return f"{plugin}[testing]" if "testing" in project.get("optional-dependencies", {}) else str(plugin)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The whole test suite against an editable install of the core and every plugin."""
    session.install("-e", ".[testing]", *(arg for p in PLUGINS for arg in ("-e", _with_testing(p))))
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11", reuse_venv=False)
def wheels(session: nox.Session) -> None:
    """Build every distribution as a wheel, install them into a fresh venv, and check that
    `rexd plugins list --json` shows every entry point the tree declares."""
    wheelhouse = Path(session.create_tmp()) / "wheelhouse"
    session.install("pip>=24", "build")
    for source in [ROOT, *PLUGINS]:
        session.run("python", "-m", "build", "--wheel", "--outdir", str(wheelhouse),
                    str(source), silent=True)
    session.install(*(str(w) for w in sorted(wheelhouse.glob("*.whl"))))
    session.run("rex", "--version")
    listing = session.run("rexd", "plugins", "list", "--json", silent=True)
    rows = {row["name"]: row for row in json.loads(listing)}
    expected = {"rexcore": "rexcore", **_entry_points()}
    for name, distribution in expected.items():
        row = rows.get(name)
        if row is None:
            session.error(f"entry point {name} ({distribution}) is missing from plugins list")
        if row["status"] not in ("active", "unavailable"):
            session.error(f"plugin {name} is {row['status']}: {row['reason']}")
        session.log(f"{name}: {row['distribution']} {row['version']} {row['status']}")
