"""CrewAI tests run offline and quiet.

CrewAI reads these at import and at kickoff: telemetry, trace uploads and the PyPI
version check would reach the network; the first-run tracing prompt would wait for
input; its SQLite stores would land in the user's data directory. They are set here,
before any test module imports CrewAI.
"""

# CrewAI must see the environment below before it is first imported.
# ruff: noqa: E402

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_STORAGE = tempfile.mkdtemp(prefix="allotment-crewai-tests-")
for _key, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
    "CREWAI_TESTING": "true",
    "CREWAI_STORAGE_DIR": _STORAGE,
}.items():
    os.environ.setdefault(_key, _value)

with warnings.catch_warnings():
    # crewai 1.15 trips an ImportWarning of its own (crewai.rag.embeddings) on import.
    warnings.simplefilter("ignore", ImportWarning)
    import crewai  # noqa: F401

import allotment
from allotment import Budget, Price
from allotment.testing import Usage
from allotment_crewai import _run
from allotment_crewai.testing import ScriptedLLM

PRICES = {"fake-1": Price(input_mtok="10", output_mtok="30")}
"""$0.025 for 1,000 input and 500 output tokens."""


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(_STORAGE, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ledger_differs(reason): this test's ledger is not meant to equal its models' logs",
    )


class Made:
    """The budgets and scripted LLMs a test made through the fixtures."""

    def __init__(self) -> None:
        self.budgets: list[Budget] = []
        self.llms: list[ScriptedLLM] = []


@pytest.fixture
def made() -> Made:
    return Made()


@pytest.fixture
def budget(made: Made) -> Callable[..., Budget]:
    """A budget on the fake-1 price list."""

    def make(usd: object = None, **kw: Any) -> Budget:
        kw.setdefault("name", "run")
        b = Budget(usd, prices=PRICES, **kw)
        made.budgets.append(b)
        return b

    return make


@pytest.fixture
def llm(made: Made) -> Callable[..., ScriptedLLM]:
    """A scripted LLM: fake-1, max_tokens 500, each call 1,000 in / 500 out ($0.025)."""

    def make(**kw: Any) -> ScriptedLLM:
        kw.setdefault("model", "fake-1")
        kw.setdefault("max_tokens", 500)
        kw.setdefault("usage", Usage(1000, 500))
        model = ScriptedLLM(**kw)
        made.llms.append(model)
        return model

    return make


@pytest.fixture(autouse=True)
def _ledger_equals_the_models_log(request: pytest.FixtureRequest, made: Made) -> Iterator[None]:
    """After every crew test: the calls the models answered are the calls the budgets
    charged, and (where every call reported usage) so are the tokens."""
    yield
    if not made.budgets or not made.llms or request.node.get_closest_marker("ledger_differs"):
        return
    spent = [b.spent for b in made.budgets]
    assert sum(s.llm_calls for s in spent) == sum(m.calls for m in made.llms)
    if not any(s.estimated for s in spent):
        billed = [m.billed_usage for m in made.llms]
        assert sum(s.input_tokens for s in spent) == sum(u.prompt_tokens for u in billed)
        assert sum(s.output_tokens for s in spent) == sum(u.completion_tokens for u in billed)
    assert all(b.report().open_holds == 0 for b in made.budgets)


@pytest.fixture
def search_tool() -> Any:
    """A CrewAI tool that counts its runs (``.runs``)."""
    from crewai.tools import BaseTool

    class Search(BaseTool):
        name: str = "search"
        description: str = "Search the web for a query."
        runs: int = 0

        def _run(self, query: str = "") -> str:
            self.runs += 1
            return f"results for {query!r}"

    return Search()


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """Each test leaves no CrewAI hook of ours registered and no tool call pending."""
    from allotment_crewai import _hooks
    from crewai.hooks.dispatch import InterceptionPoint, get_hooks

    ours = set(_hooks.table().values())
    yield
    leftover = [p for p in InterceptionPoint for h in get_hooks(p) if h in ours]
    assert not leftover, f"hooks still registered at {leftover}"
    with _run.pending_lock:
        pending = dict(_run.pending_tools)
        _run.pending_tools.clear()
    assert not pending, f"tool calls left pending: {pending}"
    assert allotment.current() is None


# Warnings CrewAI 1.15 raises from its own code while crews run, nothing to do with
# what is tested here; ignored for these tests only (the root config turns warnings
# into errors).
CREWAI_WARNINGS = (
    "ignore:function_calling_llm is deprecated:DeprecationWarning",
    # pydantic's warning when CrewAI reads its own deprecated fields (Agent.post_init_setup)
    "ignore:deprecated$:DeprecationWarning",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            for spec in CREWAI_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))
