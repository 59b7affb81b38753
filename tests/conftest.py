"""Shared test configuration: benchmarks run only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent / "benchmarks"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmarks",
        action="store_true",
        default=False,
        help="run tests/benchmarks (they print numbers and assert none)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmarks"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with --benchmarks")
    for item in items:
        if BENCHMARKS in Path(str(item.fspath)).parents:
            item.add_marker(skip)
