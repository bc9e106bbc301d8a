"""What `pip install -e .` promises (issue 20 item 2): setup.py's requirements cover every package collat
imports, and a virtualenv that holds only those requirements imports every module of the package.

The fresh-venv test cannot download anything (no network in CI's test step, and minutes of wheels): it
builds a venv whose site-packages holds links to this environment's installed copies of exactly the
declared requirements and their own requirements (transitively, markers evaluated), nothing else;
`pip install --no-deps --no-build-isolation -e .` then installs collat into it (COLLAT_NO_EXTENSION=1:
the C++ build is not what this checks; scripts/setup.sh builds it in CI). So it checks that the
declared dependency tree is sufficient, with the versions installed here; not that pip's resolver
would pick those versions from an index.
"""
import ast
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
packaging_requirements = pytest.importorskip("packaging.requirements")
from packaging.utils import canonicalize_name  # noqa: E402

# Declared but not imported by name, each for a reason.
INDIRECT = {
    "torchvision": "open_clip imports it; declared so that pip keeps the build that matches torch",
    "tensorboard": "imported by torch.utils.tensorboard (--report-to tensorboard)",
    "huggingface-hub": "the hub-style save/load of collat.model; transformers needs it too",
    "triton": "imported by collat.kernels (the Triton kernels and their CPU interpreter)",
    "jinja2": "huggingface_hub renders collat's model card (README.md of a checkpoint) with it",
}
OPTIONAL = {"aac_metrics": "captioning", "torchao": "fp8"}  # imported only where guarded, so they live in extras


def declared() -> tuple[list[str], dict[str, list[str]]]:
    """setup.py's INSTALL_REQUIRES and EXTRAS_REQUIRE, read without running setup.py."""
    values = {}
    for node in ast.parse(open(os.path.join(ROOT, "setup.py")).read()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("INSTALL_REQUIRES",
                                                                                     "EXTRAS_REQUIRE"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["INSTALL_REQUIRES"], values["EXTRAS_REQUIRE"]


def imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> files of collat/ and kernels/ that import it (anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for package in ("collat", "kernels"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                for node in ast.walk(ast.parse(open(path).read())):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                    for module in names:
                        found.setdefault(module.split(".")[0], set()).add(os.path.relpath(path, ROOT))
    return found


def test_install_requires_covers_every_import():
    base, extras = declared()
    base_names = {canonicalize_name(packaging_requirements.Requirement(r).name) for r in base}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules().items():
        if module in sys.stdlib_module_names or module in ("collat", "kernels", "__future__"):
            continue
        if module in OPTIONAL:
            assert any(packaging_requirements.Requirement(r).name.replace("-", "_") == module
                       for r in extras[OPTIONAL[module]]), module
            continue
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not names & base_names:
            missing[module] = sorted(files)
    assert not missing, f"imported but not in install_requires: {missing}"
    imported = {canonicalize_name(d) for m in imported_modules() for d in distributions.get(m, [])}
    unused = base_names - imported - set(INDIRECT)
    assert not unused, f"in install_requires but never imported (add the reason to INDIRECT): {sorted(unused)}"


def test_pins_and_ranges_hold_for_what_is_installed():
    base, extras = declared()
    by_name = {canonicalize_name(r.name): r for r in map(packaging_requirements.Requirement, base)}
    assert str(by_name["open-clip-torch"].specifier) == "==3.3.0"  # exactly: text towers are loaded by key
    for name in ("torch", "torchaudio", "torchvision"):  # a tested range, not a pin
        assert by_name[name].specifier and not str(by_name[name].specifier).startswith("==")
    for name, requirement in by_name.items():
        if requirement.marker is None or requirement.marker.evaluate():
            version = importlib.metadata.version(name)
            assert requirement.specifier.contains(version, prereleases=True), (name, version, requirement)
    assert {"captioning", "dev"} <= set(extras) and extras["captioning"] == ["aac-metrics==0.5.4"]
    assert {"pytest", "ruff"} <= set(extras["dev"])


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Installed distributions needed by `requirements`, transitively (extras of dependencies ignored)."""
    todo, seen = list(requirements), set()
    while todo:
        requirement = packaging_requirements.Requirement(todo.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        todo += importlib.metadata.distribution(name).requires or []
    return seen


def _link_distribution(name: str, site: str) -> None:
    distribution = importlib.metadata.distribution(name)
    tops = {str(f).split("/")[0] for f in distribution.files or [] if not str(f).startswith("..")}
    for top in tops:
        source, target = str(distribution.locate_file(top)), os.path.join(site, top)
        if os.path.exists(source) and not os.path.lexists(target):
            os.symlink(source, target)


@pytest.mark.slow
def test_a_venv_with_only_the_declared_requirements_imports_every_module(tmp_path):
    base, _ = declared()
    build = ["setuptools", "wheel", "pip"]  # pyproject's build requirements (torch is declared) and the installer
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    closure = _requirement_closure(base + build)
    for name in closure:
        _link_distribution(name, site)
    env = {**os.environ, "COLLAT_NO_EXTENSION": "1", "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT],
                             env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    script = (
        "import importlib, importlib.metadata, json, pkgutil, sys, collat\n"
        "outside = [p for p in sys.path if p.endswith('site-packages') and not p.startswith(sys.prefix)]\n"
        "assert not outside, outside\n"
        "names = [m.name for m in pkgutil.walk_packages(collat.__path__, 'collat.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(json.dumps({'modules': names, 'requires': importlib.metadata.requires('collat')}))\n"
    )
    env["TRITON_INTERPRET"] = "1"
    check = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                           cwd=str(tmp_path))
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) >= 40 and "collat.train.loop" in report["modules"]

    def specs(requirements):
        parsed = map(packaging_requirements.Requirement, requirements)
        return {(canonicalize_name(r.name), str(r.specifier)) for r in parsed if "extra" not in str(r.marker)}

    assert specs(report["requires"]) == specs(base)  # the metadata pip wrote is setup.py's list
