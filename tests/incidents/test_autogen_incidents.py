"""AutoGen incidents from INCIDENTS.md (8, 9, 10, 14, 15), reproduced in real AutoGen teams
whose model calls go through AutoGen's own OpenAI client to a scripted provider.

Every scenario also checks the three invariants: recorded spend <= cap; the provider's
call count equals the calls the budget admitted; nothing is left held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import allotment
import pytest
from allotment.testing import Reply, Request, ScriptedProvider, ToolCall
from allotment.testing import Usage as Billed
from allotment_autogen import BudgetedChatCompletionClient, BudgetMiddleware
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_agentchat.tools import AgentTool
from autogen_core import CancellationToken, SingleThreadedAgentRuntime
from autogen_core.models import (
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    ModelInfo,
    RequestUsage,
)
from autogen_core.tools import Tool, ToolSchema
from autogen_ext.models.openai import OpenAIChatCompletionClient

# AutoGen warns on every RPC whose handler returns None (GroupChatStart's does) as soon as
# any intervention handler is installed; the middleware cannot change that return value.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Intervention handler on_response returned None:RuntimeWarning"
)

MODEL = "gpt-4o-mini-2024-07-18"  # dated: AutoGen warns when an alias resolves elsewhere
SELECTOR = "You are in a role play game"
TIMEOUT = 30.0
FAKE = allotment.Price(input_mtok="10", output_mtok="30")
FREE = allotment.Price(input_mtok="0", output_mtok="0")
INFO = ModelInfo(
    vision=False,
    function_calling=True,
    json_output=False,
    family="unknown",
    structured_output=False,
)


@pytest.fixture
def provider() -> Iterator[ScriptedProvider]:
    with ScriptedProvider(default=None) as p:
        yield p


@pytest.fixture
async def client(provider: ScriptedProvider) -> AsyncIterator[Callable[..., Any]]:
    made: list[OpenAIChatCompletionClient] = []

    def make(model: str = MODEL, **kwargs: Any) -> OpenAIChatCompletionClient:
        if model != MODEL:
            kwargs.setdefault("model_info", INFO)
        made.append(
            OpenAIChatCompletionClient(
                model=model,
                base_url=provider.base_url,
                api_key=provider.api_key,
                max_retries=0,
                **kwargs,
            )
        )
        return made[-1]

    yield make
    for c in made:
        await c.close()


def system_of(request: Request) -> str:
    first = request.messages[0].get("content", "") if request.messages else ""
    return first if isinstance(first, str) else ""


def agent(name: str, model_client: Any, **kwargs: Any) -> AssistantAgent:
    return AssistantAgent(
        name, model_client=model_client, system_message=f"You are {name}.", **kwargs
    )


@asynccontextmanager
async def runtime(middleware: BudgetMiddleware) -> AsyncIterator[SingleThreadedAgentRuntime]:
    rt = SingleThreadedAgentRuntime(intervention_handlers=[middleware])
    rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


def assert_invariants(budget: allotment.Budget, provider: ScriptedProvider) -> None:
    spent = budget.spent
    cap = budget.limits.usd
    if cap is not None:
        assert spent.usd is not None
        assert spent.usd <= cap
    if budget.limits.llm_calls is not None:
        assert spent.llm_calls <= budget.limits.llm_calls
    assert provider.calls == provider.attempts == spent.llm_calls
    assert budget.report().open_holds == 0
    assert budget.held.llm_calls == 0


# -- 8 ------------------------------------------------------------------------------------


async def test_atgn_002_cascading_group_chat_loop_stops_at_the_team_cap_with_no_agent_over(
    provider: ScriptedProvider, client: Callable[..., Any]
) -> None:
    """Incident 8 [ATGN-002 autogen#5317, ATGN-019 #1464]: four agents in a round robin
    keep answering each other. Team cap 6 calls, 2 per agent: the team stops at the cap
    with a typed refusal, and no agent made more than 2 calls."""
    provider.responder = lambda request: Reply.text("Let me add one more thought.")
    names = ["planner", "coder", "reviewer", "tester"]
    shared = client(max_tokens=64)

    # Without a budget the loop is real: it only ends where max_turns cuts it.
    loose = RoundRobinGroupChat([agent(n, shared) for n in names], max_turns=10)
    await asyncio.wait_for(loose.run(task="Build it."), TIMEOUT)
    assert provider.calls == 10
    provider.reset()

    budget = allotment.Budget(usd="1.00", llm_calls=6, name="team")
    middleware = BudgetMiddleware(budget, per_agent={n: {"llm_calls": 2} for n in names})
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat([agent(n, shared) for n in names], runtime=rt)
        with pytest.raises(allotment.BudgetExceeded) as stopped:
            await asyncio.wait_for(team.run(task="Build it."), TIMEOUT)
    assert stopped.value.path == "team"
    assert stopped.value.limit_name == "llm_calls"
    report = budget.report()
    calls = {n: report.find(n).spent.llm_calls for n in names}
    assert sum(calls.values()) == 6
    assert max(calls.values()) <= 2
    assert calls == {"planner": 2, "coder": 2, "reviewer": 1, "tester": 1}
    assert_invariants(budget, provider)


# -- 9 ------------------------------------------------------------------------------------


def _selector_script() -> Callable[[Request], Reply]:
    turns = iter(["coder", "reviewer", "planner"] * 10)

    def respond(request: Request) -> Reply:
        if system_of(request).startswith(SELECTOR):
            return Reply.text(next(turns))
        return Reply.text("Here is my part of the work.")

    return respond


@pytest.mark.parametrize("how", ["wrapped clients", "runtime middleware"])
async def test_atgn_006_hidden_selector_calls_are_on_the_ledger(
    provider: ScriptedProvider, client: Callable[..., Any], how: str
) -> None:
    """Incident 9 [ATGN-006, ATGN-018]: SelectorGroupChat's speaker selection calls appear
    in no message's models_usage. With the clients wrapped (by hand, or by the middleware)
    the ledger equals the sum of every model call the provider saw, selection included."""
    from autogen_agentchat.conditions import MaxMessageTermination

    provider.responder = _selector_script()
    budget = allotment.Budget(usd="0.50", name="selector")
    inner = client(max_tokens=64)
    shared: ChatCompletionClient = (
        BudgetedChatCompletionClient(inner, budget) if how == "wrapped clients" else inner
    )
    agents: list[Any] = [
        agent(n, shared, description=f"the {n}") for n in ("planner", "coder", "reviewer")
    ]
    stop = MaxMessageTermination(7)
    if how == "wrapped clients":
        team = SelectorGroupChat(agents, model_client=shared, termination_condition=stop)
        result = await asyncio.wait_for(team.run(task="Ship it."), TIMEOUT)
    else:
        async with runtime(BudgetMiddleware(budget)) as rt:
            team = SelectorGroupChat(
                agents, model_client=shared, termination_condition=stop, runtime=rt
            )
            result = await asyncio.wait_for(team.run(task="Ship it."), TIMEOUT)

    selections = [r for r in provider.requests if system_of(r).startswith(SELECTOR)]
    assert len(selections) >= 5
    billed = provider.billed_usage
    spent = budget.spent
    assert spent.llm_calls == provider.calls
    assert (spent.input_tokens, spent.output_tokens) == (
        billed.prompt_tokens,
        billed.completion_tokens,
    )
    # What AutoGen's own messages account for misses the selection calls.
    usages = [getattr(m, "models_usage", None) for m in result.messages]
    visible = sum(u.prompt_tokens + u.completion_tokens for u in usages if u is not None)
    assert visible < spent.total_tokens
    selected = sum((r.charged or Billed(0, 0)).total_tokens for r in selections)
    assert visible + selected == spent.total_tokens
    if how == "runtime middleware":
        manager = budget.report().find("SelectorGroupChatManager")
        assert manager.spent.llm_calls == len(selections)
    assert_invariants(budget, provider)


# -- 10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrapped clients", "runtime middleware"])
async def test_atgn_003_swarm_handoff_loop_is_stopped_with_a_typed_error_from_run(
    provider: ScriptedProvider, client: Callable[..., Any], how: str
) -> None:
    """Incident 10 [ATGN-003 #5831]: two Swarm agents hand off to each other forever. The
    budget stops the team, and ``team.run()`` raises ``BudgetExceeded`` itself (not the
    RuntimeError AutoGen's runtime turns it into)."""

    def respond(request: Request) -> Reply:
        target = "bob" if system_of(request).startswith("You are alice.") else "alice"
        return Reply.tool_call(f"transfer_to_{target}")

    provider.responder = respond
    budget = allotment.Budget(usd="0.0005", name="swarm")
    inner = client(max_tokens=64)
    shared: ChatCompletionClient = (
        BudgetedChatCompletionClient(inner, budget) if how == "wrapped clients" else inner
    )
    alice = agent("alice", shared, handoffs=["bob"])
    bob = agent("bob", shared, handoffs=["alice"])
    if how == "wrapped clients":
        team = Swarm([alice, bob])
        with pytest.raises(allotment.BudgetExceeded) as stopped:
            await asyncio.wait_for(team.run(task="Who answers?"), TIMEOUT)
    else:
        async with runtime(BudgetMiddleware(budget)) as rt:
            team = Swarm([alice, bob], runtime=rt)
            with pytest.raises(allotment.BudgetExceeded) as stopped:
                await asyncio.wait_for(team.run(task="Who answers?"), TIMEOUT)
        handoffs = dict(budget.spent.tools)
        assert handoffs["transfer_to_bob"] + handoffs["transfer_to_alice"] == provider.calls
    assert isinstance(stopped.value, allotment.BudgetExceeded)
    assert stopped.value.limit_name == "usd"
    assert provider.calls >= 5  # it did loop, until the money ran out
    assert_invariants(budget, provider)


# -- 14 -----------------------------------------------------------------------------------

FAN_OUT = ("scout_a", "scout_b", "scout_c")
ESTIMATE = Decimal("0.00031")
COST = Decimal("0.00023")


class FixedEstimate:
    """An estimator for ``fake-1`` calls: an upper bound of 10 input and 7 output tokens
    ($0.00031 at $10/$30 per million); other models fall through to the default."""

    @allotment.hookimpl(tryfirst=True)
    def allotment_estimate(self, call: allotment.Call) -> allotment.Estimate | None:
        if call.model != "fake-1" or call.kind != "llm":
            return None
        return allotment.Estimate(
            usage=allotment.Usage(input_tokens=10, output_tokens=7, llm_calls=1)
        )


@pytest.fixture
def fixed_estimate() -> Iterator[None]:
    plugin = FixedEstimate()
    allotment.plugins().register(plugin)
    try:
        yield
    finally:
        allotment.plugins().unregister(plugin)


def _fan_out_script(request: Request) -> Reply:
    if request.model == "router-free":
        return Reply.tool_calls(*(ToolCall(n, {"task": "scout"}) for n in FAN_OUT))
    return Reply.text("scouted", usage=Billed(prompt_tokens=2, completion_tokens=7))


class NaiveGuard(ChatCompletionClient):
    """The negative control: check ``spent + estimate <= cap`` before the call, record
    after it. Between the two is an ``await``."""

    def __init__(self, inner: ChatCompletionClient, budget: allotment.Budget) -> None:
        self.inner = inner
        self.budget = budget

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        **kwargs: Any,
    ) -> CreateResult:
        call = allotment.Call(model="fake-1", messages=[str(m.content) for m in messages])
        _, estimate = self.budget.estimate(call)
        spent = self.budget.spent.usd or Decimal(0)
        cap = self.budget.limits.usd
        assert estimate is not None
        assert cap is not None
        if spent + estimate > cap:
            raise allotment.BudgetExceeded("naive check refused", path=self.budget.path)
        result = await self.inner.create(messages, tools=tools, **kwargs)
        usage = allotment.Usage(
            input_tokens=result.usage.prompt_tokens,
            output_tokens=result.usage.completion_tokens,
            llm_calls=1,
        )
        self.budget.charge(usage, call=call)
        return result

    def create_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        await self.inner.close()

    def actual_usage(self) -> RequestUsage:
        return self.inner.actual_usage()

    def total_usage(self) -> RequestUsage:
        return self.inner.total_usage()

    def count_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return self.inner.count_tokens(messages, **kwargs)

    def remaining_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return self.inner.remaining_tokens(messages, **kwargs)

    @property
    def capabilities(self) -> Any:
        return self.inner.model_info

    @property
    def model_info(self) -> ModelInfo:
        return self.inner.model_info


def _fan_out_team(orchestrator_client: Any, scout_client: Any, runtime: Any = None) -> Any:
    scouts = [AgentTool(agent(n, scout_client)) for n in FAN_OUT]
    boss = agent("orchestrator", orchestrator_client, tools=scouts)
    return RoundRobinGroupChat([boss], max_turns=1, runtime=runtime)


@pytest.mark.usefixtures("fixed_estimate")
async def test_incident_14_delegation_fan_out_race_admits_exactly_one_in_30_of_30_trials(
    provider: ScriptedProvider, client: Callable[..., Any]
) -> None:
    """Incident 14: three sub-agents (agent tools called in parallel) start at once under
    one parent with $0.00060 left; each call is estimated at $0.00031 and costs $0.00023.
    The reservation admits exactly one ($0.00023 spent, zero overshoot) in 30 of 30
    trials; a naive check-then-record guard admits all three ($0.00069) every time."""
    provider.responder = _fan_out_script
    prices = {"fake-1": FAKE, "router-free": FREE}
    orchestrator, scout = client("router-free"), client("fake-1")

    outcomes = []
    for trial in range(30):
        provider.reset()
        budget = allotment.Budget(usd="0.00060", prices=prices, name=f"trial{trial}")
        _, estimate = budget.estimate(allotment.Call(model="fake-1", messages=["scout"]))
        assert estimate == ESTIMATE
        async with runtime(BudgetMiddleware(budget)) as rt:
            await asyncio.wait_for(_fan_out_team(orchestrator, scout, rt).run(task="Go."), TIMEOUT)
        scouts = [budget.report().find(f"{budget.path}/orchestrator/{n}") for n in FAN_OUT]
        outcomes.append((budget.spent.usd, sorted(s.spent.llm_calls for s in scouts)))
        assert_invariants(budget, provider)
        assert provider.calls == 2  # the orchestrator and the one admitted scout
    assert outcomes == [(COST, [0, 0, 1])] * 30

    naive = []
    for trial in range(30):
        provider.reset()
        budget = allotment.Budget(usd="0.00060", prices=prices, name=f"naive{trial}")
        team = _fan_out_team(orchestrator, NaiveGuard(scout, budget))
        await asyncio.wait_for(team.run(task="Go."), TIMEOUT)
        naive.append(budget.spent.usd)
        assert provider.calls == 4
    assert naive == [3 * COST] * 30
    assert Decimal("0.00060") < 3 * COST


# -- 15 -----------------------------------------------------------------------------------


class Closes:
    """Collects the budget close events, with the escrow each returned."""

    def __init__(self) -> None:
        self.returned: dict[str, Mapping[str, int]] = {}

    @allotment.hookimpl
    def allotment_event(self, event: allotment.Event) -> None:
        if event.kind == "close":
            self.returned[event.path] = event.detail.get("returned", {})


@pytest.fixture
def closes() -> Iterator[Closes]:
    sink = Closes()
    allotment.plugins().register(sink)
    try:
        yield sink
    finally:
        allotment.plugins().unregister(sink)


async def test_incident_15_child_budgets_split_and_return_their_unspent_escrow(
    provider: ScriptedProvider, client: Callable[..., Any], closes: Closes
) -> None:
    """Incident 15: a $1.00 parent allots $0.30 to each of three sub-agents; each spends
    $0.10 (1 input + 3,333 output tokens of fake-1). When they finish, $0.20 of each
    returns, and the parent shows $0.30 spent with a per-child breakdown."""
    names = ("r1", "r2", "r3")

    def respond(request: Request) -> Reply:
        if request.model == "router-free":
            return Reply.tool_calls(*(ToolCall(n, {"task": "research"}) for n in names))
        return Reply.text("report", usage=Billed(prompt_tokens=1, completion_tokens=3333))

    provider.responder = respond
    budget = allotment.Budget(usd="1.00", prices={"fake-1": FAKE, "router-free": FREE})
    researchers = client("fake-1", max_tokens=4000)
    tools = [AgentTool(agent(n, researchers)) for n in names]
    middleware = BudgetMiddleware(budget, children={n: "0.30" for n in names})
    held_during: list[Decimal] = []

    async def watch() -> None:  # what the parent set aside for its children, while it ran
        while True:
            report = budget.report()
            held_during.append(report.allotted_usd + (report.held.usd or 0))
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    async with runtime(middleware) as rt:
        team = RoundRobinGroupChat(
            [agent("lead", client("router-free"), tools=tools)], max_turns=1, runtime=rt
        )
        await asyncio.wait_for(
            team.run(task="Research."),
            TIMEOUT,
        )
    watcher.cancel()

    assert max(held_during) == Decimal("0.90")
    report = budget.report()
    assert report.spent.usd == Decimal("0.30")
    assert report.allotted_usd == 0
    assert budget.remaining.usd == Decimal("0.70")
    for name in names:
        child = report.find(f"{budget.path}/lead/{name}")
        assert child.limits == {"usd": Decimal("0.30")}
        assert child.spent.usd == Decimal("0.10")
        assert child.closed
        assert closes.returned[child.path]["usd"] == 200_000_000  # $0.20, in nano-dollars
    assert_invariants(budget, provider)


async def test_incident_15_cancelled_parent_returns_every_childs_escrow(
    provider: ScriptedProvider, client: Callable[..., Any]
) -> None:
    """Incident 15, cancelled half-way: the sub-agents' requests are with the provider when
    the parent is cancelled; every child closes, all escrow returns, nothing is held."""
    names = ("r1", "r2", "r3")

    def respond(request: Request) -> Reply:
        if request.model == "router-free":
            return Reply.tool_calls(*(ToolCall(n, {"task": "research"}) for n in names))
        return Reply.text("late", delay=5.0)

    provider.responder = respond
    budget = allotment.Budget(usd="1.00", prices={"fake-1": FAKE, "router-free": FREE})
    tools = [AgentTool(agent(n, client("fake-1", max_tokens=100))) for n in names]
    token = CancellationToken()
    async with runtime(BudgetMiddleware(budget, children={n: "0.30" for n in names})) as rt:
        team = RoundRobinGroupChat(
            [agent("lead", client("router-free"), tools=tools)], max_turns=1, runtime=rt
        )
        running = asyncio.ensure_future(team.run(task="Research.", cancellation_token=token))
        while provider.attempts < 4:
            await asyncio.sleep(0.01)
        token.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, TIMEOUT)
    report = budget.report()
    assert report.allotted_usd == 0
    assert all(report.find(f"{budget.path}/lead/{n}").closed for n in names)
    assert_invariants(budget, provider)
