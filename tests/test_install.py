"""Install truth: what pyproject promises matches what the pins and the code need, and what the README and
the job scripts tell a new user to run exists."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {name.lower(): v for name, v in (line.split("==") for line in lines if "==" in line and not line.startswith("#"))}


def test_every_dependency_has_a_floor_at_or_below_its_pin():
    project = PYPROJECT["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
    pinned = pins()
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?>=([0-9.]+)", dep)
        assert m, f"{dep}: a floor (>=) and nothing else, so cluster installs can pick CUDA builds"
        name, floor = m.group(1).lower(), m.group(3)
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert Version(floor) <= Version(pinned[name]), f"{name}: floor {floor} above the pin {pinned[name]}"


def test_requires_python_is_what_the_pins_need():
    # numpy 2.4 and scipy 1.17 (constraints.txt) need Python 3.11
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert Version(pins()["numpy"]) >= Version("2.3") and Version(pins()["scipy"]) >= Version("1.16")


def test_readme_quickstart_clones_installs_without_test_extras_and_names_the_cpu_wheel():
    quick = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "Python ≥ 3.11" in quick and "git clone " in quick
    main_job = next(line for line in quick.splitlines() if "raysys pipeline configs/pipeline/demo.yaml" in line)
    assert "pip install -c constraints.txt -e . &&" in main_job and "[test]" not in main_job
    assert "--index-url https://download.pytorch.org/whl/cpu" in quick
    assert f"torch=={pins()['torch']}" in quick  # the version the constraints pin


def test_config_files_named_in_job_docstrings_exist():
    named = {m for path in (ROOT / "jobs").glob("*.py")
             for m in re.findall(r"configs/[a-z]+/[A-Za-z0-9_.-]+\.yaml", path.read_text())}
    assert named, "no config named in jobs/"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, missing


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_and_docs_links_point_at_files_and_headings_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                if anchor not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
    # the README stays a user's page: the measurement notebook lives in docs/results.md
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
