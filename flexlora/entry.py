"""The `flexlora` console script: refuse to start, saying why, when another package shadows one of ours."""

from __future__ import annotations

import sys

from flexlora.packages import ShadowedPackage, check_own_packages


def main() -> None:
    try:
        check_own_packages()
    except ShadowedPackage as exc:
        print(f"flexlora: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from flexlora.cli import app, explain

    try:
        app()
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        print(f"flexlora: {message}", file=sys.stderr)
        raise SystemExit(2) from None
