"""Real sample data carried by installed PyPI packages (a chest CT with lobe labels, chest X-rays, Open-i reports, a
pretrained BERT), located without importing those packages, whose imports are heavy. `scripts/setup.sh` installs
them; nothing here is ever copied into the repository."""

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def sample_path(package: str, relative: str = "") -> Path:
    """`relative` inside the installed `package`; a clear error when the package or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"sample-data package {package!r} is not installed: run `bash scripts/setup.sh`")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def resolve(name: str | None) -> str | None:
    """`pkg://package/sub/path` -> that path inside an installed package; any other name is returned unchanged."""
    if name is None or not name.startswith(PACKAGE_SCHEME):
        return name
    package, _, relative = name[len(PACKAGE_SCHEME) :].partition("/")
    return str(sample_path(package, relative))
