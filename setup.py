"""Which packages the wheel holds, found rather than listed (the metadata is in pyproject.toml).

``dmoe/`` and every folder below it; ``node/`` and ``coordinator/`` are installed as ``dmoe.node`` and
``dmoe.coordinator``. Folders without an ``__init__.py`` (the dashboard's ``static/``) are found as
namespace packages, so their files ship as package data without a warning.
"""

from setuptools import find_namespace_packages, setup

PACKAGE_DIRS = {"dmoe": "dmoe", "dmoe.node": "node", "dmoe.coordinator": "coordinator"}
EXCLUDE = ["__pycache__", "*.__pycache__", "*.egg-info"]


def found(name: str, where: str) -> list[str]:
    return [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where, exclude=EXCLUDE)]


packages = sorted({p for name, where in PACKAGE_DIRS.items() for p in found(name, where)})
setup(packages=packages, package_dir={k: v for k, v in PACKAGE_DIRS.items() if k != "dmoe"})
