"""The project's import names, and a check that none is shadowed by another package.

The top-level folders (`schemas`, `broker`, `aggregator`, `edge_client`, `experiments`, `flexlora`) are the
project's design and its import names, installed as they are. A device whose environment already holds
another package of one of these names would otherwise fail with an unrelated ImportError deep in a round;
`check_own_packages` says which name clashes, where the other package lives, and what to do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = ("schemas", "broker", "aggregator", "edge_client", "experiments", "flexlora")


class ShadowedPackage(RuntimeError):
    pass


def check_own_packages(names: tuple[str, ...] = PACKAGES) -> None:
    """Each name must resolve to the folder beside this one (the same installation); raises ShadowedPackage."""
    root = Path(__file__).resolve().parent.parent
    for name in names:
        spec = importlib.util.find_spec(name)
        where = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
        if where != root / name:
            raise ShadowedPackage(
                f"the import name {name!r} resolves to {where or 'nothing'}, not to FlexLoRA's {root / name}: "
                "another installed package has that name. Install FlexLoRA in its own virtualenv "
                "(`python -m venv` then `pip install`), or remove the other package from this one."
            )
