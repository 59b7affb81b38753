"""``BudgetedChatCompletionClient``: any AutoGen model client, behind a budget."""

from __future__ import annotations

import warnings
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, Self

import allotment
from autogen_core import CancellationToken, Component, ComponentModel
from autogen_core.models import (
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    ModelCapabilities,
    ModelInfo,
    RequestUsage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from . import _meter, _teams, _translate

_NO_ARGS: Mapping[str, Any] = MappingProxyType({})


class BudgetedChatCompletionClientConfig(BaseModel):
    """Declarative form of a ``BudgetedChatCompletionClient``. A budget is a live handle and
    is not serialised: a loaded client charges the budget active when it is called."""

    client: ComponentModel
    agent: str | None = None
    clamp: bool = False
    model: str | None = None
    provider: str | None = None


class BudgetedChatCompletionClient(
    ChatCompletionClient, Component[BudgetedChatCompletionClientConfig]
):
    """Wraps a ``ChatCompletionClient`` so that every call is reserved on a budget first.

    ``create`` and ``create_stream`` reserve an upper bound of the call on ``budget`` (else
    on the active budget: ``with budget.activate():`` or ``instrument(budget)``) and every
    ancestor before the inner client is called; a refusal raises
    ``allotment.BudgetExceeded`` and nothing is sent. After the call the hold is settled
    from ``CreateResult.usage``; a result without usage (AutoGen reports 0/0) is charged
    as a flagged estimate, never as free. Streams from OpenAI-compatible clients ask for
    usage (``stream_options.include_usage``) unless the request or client sets it; a
    stream that runs past its hold is cut and charged. A call that fails is released; a
    call cancelled after it was sent is charged its bound (the provider may finish it).

    Args:
        inner: the client to wrap.
        budget: the budget to charge; ``None`` resolves the active budget at each call.
            When a sub-agent's child budget (a descendant of this one) is active, the child
            is charged, and through it this budget.
        agent: the agent's name, passed to plugins with each call.
        clamp: lower the request's ``max_tokens`` to what the remaining dollars afford
            after the input (clients that take ``max_tokens`` in ``extra_create_args``:
            OpenAI, Azure OpenAI, Anthropic).
        model: the model name to price by, for clients that do not expose it (replay and
            custom clients); the inner client's own setting otherwise.
        provider: the provider id for pricing, when the client's module does not say.
    """

    component_type = "model"
    component_config_schema = BudgetedChatCompletionClientConfig
    component_provider_override = "allotment_autogen.BudgetedChatCompletionClient"

    def __init__(
        self,
        inner: ChatCompletionClient,
        budget: allotment.Budget | None = None,
        *,
        agent: str | None = None,
        clamp: bool = False,
        model: str | None = None,
        provider: str | None = None,
    ) -> None:
        if not isinstance(inner, ChatCompletionClient):
            raise allotment.ConfigurationError(
                f"BudgetedChatCompletionClient wraps an AutoGen ChatCompletionClient, "
                f"not {type(inner).__name__}"
            )
        if budget is not None and not isinstance(budget, allotment.Budget):
            raise allotment.ConfigurationError(
                f"budget must be an allotment.Budget or None, not {type(budget).__name__}"
            )
        self._inner = inner
        self._budget = budget
        self._agent = agent
        self._clamp = bool(clamp)
        self._model = model
        self._provider = provider
        self._facts = _translate.facts_of(inner, model=model, provider=provider)
        # In a team, our refusals must come out of team.run() typed.
        _teams.hold_for(self)

    def __repr__(self) -> str:
        budget = self._budget.path if self._budget is not None else "active budget"
        return f"<BudgetedChatCompletionClient {type(self._inner).__name__} on {budget}>"

    # -- what it wraps -------------------------------------------------------------------

    @property
    def inner(self) -> ChatCompletionClient:
        """The wrapped client."""
        return self._inner

    @property
    def budget(self) -> allotment.Budget | None:
        """The budget it charges; ``None`` means the active budget at each call."""
        return self._budget

    @property
    def agent(self) -> str | None:
        """The agent name it reports with each call."""
        return self._agent

    @property
    def clamp(self) -> bool:
        """Whether it lowers ``max_tokens`` to what the budget affords."""
        return self._clamp

    @property
    def model(self) -> str | None:
        """The model name it prices by (given, or found on the inner client)."""
        return self._facts.model

    @property
    def facts(self) -> _translate.ClientFacts:
        """What it knows about the calls its inner client makes."""
        return self._facts

    def rebind(self, budget: allotment.Budget | None, *, agent: str | None = None) -> Self:
        """The same client with another budget (and agent name), sharing the inner client."""
        return type(self)(
            self._inner,
            budget,
            agent=agent if agent is not None else self._agent,
            clamp=self._clamp,
            model=self._model,
            provider=self._provider,
        )

    # -- calls ---------------------------------------------------------------------------

    def _request(
        self,
        messages: Sequence[LLMMessage],
        tools: Sequence[Tool | ToolSchema],
        json_output: bool | type[BaseModel] | None,
        extra: Mapping[str, Any],
    ) -> tuple[allotment.Budget, allotment.Call, Mapping[str, Any]]:
        budget = _meter.pick(self._budget)
        if budget is None:
            raise _meter.no_budget(f"model client {type(self._inner).__name__}")
        extra = dict(extra)  # a fresh dict: caches serialise it, clients may change it
        call = _translate.call_of(
            messages, tools, json_output, extra, self._facts, agent=self._agent
        )
        if self._clamp:
            call, extra = _meter.clamped(budget, call, extra)
        return budget, call, extra

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = _NO_ARGS,
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        """Reserve, call the inner client's ``create``, settle from its usage."""
        if _meter.metering.get():  # an outer wrapper already holds this call
            return await self._inner.create(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=dict(extra_create_args),
                cancellation_token=cancellation_token,
            )
        budget, call, extra = self._request(messages, tools, json_output, extra_create_args)
        result: CreateResult = await _meter.create(
            budget,
            call,
            self._facts,
            lambda: self._inner.create(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra,
                cancellation_token=cancellation_token,
            ),
            cancellation_token,
        )
        return result

    def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = _NO_ARGS,
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """Reserve, stream from the inner client's ``create_stream``, settle from the final
        result's usage (or from what was streamed, flagged as an estimate)."""
        if _meter.metering.get():
            return self._inner.create_stream(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=dict(extra_create_args),
                cancellation_token=cancellation_token,
            )
        budget, call, extra = self._request(messages, tools, json_output, extra_create_args)
        if self._facts.stream_usage_option and not self._facts.stream_options_set:
            extra = _with_stream_usage(extra)
        return _meter.stream(
            budget,
            call,
            self._facts,
            lambda: self._inner.create_stream(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                json_output=json_output,
                extra_create_args=extra,
                cancellation_token=cancellation_token,
            ),
            cancellation_token,
        )

    # -- delegated -----------------------------------------------------------------------

    async def close(self) -> None:
        await self._inner.close()

    def actual_usage(self) -> RequestUsage:
        return self._inner.actual_usage()

    def total_usage(self) -> RequestUsage:
        return self._inner.total_usage()

    def count_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return self._inner.count_tokens(messages, tools=tools)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return self._inner.remaining_tokens(messages, tools=tools)

    @property
    def capabilities(self) -> ModelCapabilities:
        warnings.warn(
            "capabilities is deprecated, use model_info instead", DeprecationWarning, stacklevel=2
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # said once, above
            return self._inner.capabilities

    @property
    def model_info(self) -> ModelInfo:
        return self._inner.model_info

    # -- component -----------------------------------------------------------------------

    def _to_config(self) -> BudgetedChatCompletionClientConfig:
        return BudgetedChatCompletionClientConfig(
            client=self._inner.dump_component(),
            agent=self._agent,
            clamp=self._clamp,
            model=self._model,
            provider=self._provider,
        )

    @classmethod
    def _from_config(cls, config: BudgetedChatCompletionClientConfig) -> Self:
        return cls(
            ChatCompletionClient.load_component(config.client),
            agent=config.agent,
            clamp=config.clamp,
            model=config.model,
            provider=config.provider,
        )


def _with_stream_usage(extra: Mapping[str, Any]) -> Mapping[str, Any]:
    if "stream_options" in extra:
        return extra  # the request decides
    return {**extra, "stream_options": {"include_usage": True}}
