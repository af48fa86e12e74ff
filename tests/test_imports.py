"""Architecture rules that a test can hold: kdcore never imports ray or services."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_all_of_kdcore_does_not_import_ray():
    code = (
        "import pkgutil, importlib, sys, kdcore\n"
        "for m in pkgutil.walk_packages(kdcore.__path__, 'kdcore.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.') or k.startswith('services'))\n"
        "print(len([k for k in sys.modules if k.startswith('kdcore')]), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[0]) > 10  # the walk really imported the package


def test_kdcore_source_never_names_ray_or_services():
    offenders = []
    for path in (ROOT / "kdcore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("ray", "services")]
    assert not offenders, offenders
