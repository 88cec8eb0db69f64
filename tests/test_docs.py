"""The README's map of python/spd/ names every module, so a new module cannot go undocumented."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_map() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```", readme.index("Inside `python/spd/`")) + 3
    return readme[start:readme.index("```", start)]


def test_readme_module_map_names_every_module():
    package = ROOT / "python" / "spd"
    modules = {p.name for p in package.glob("*.py") if not p.name.startswith("_")}
    modules |= {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
    named = set(re.findall(r"(?<![\w/])([a-z_]+\.py|[a-z_]+/)(?=\s)", _module_map()))
    assert modules - named == set(), "README's module map misses these; add a line for each"
    assert named - modules == set(), "README's module map names modules that do not exist"
