"""Query engines, retrievers and embeddings: a query is one budget scope; embeddings are
reserved for their texts and settled as flagged estimates."""

from __future__ import annotations

import allotment
import pytest
from allotment.testing import Reply, ScriptedProvider
from allotment_llamaindex import BudgetCallbackHandler, instrument
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.callbacks import CallbackManager
from llama_index.core.embeddings.mock_embed_model import MockEmbedding
from llama_index.core.tools import QueryEngineTool
from llamaindex_fakes import (
    PRICES,
    CountingEmbedding,
    ScriptedLLM,
    openai_llm,
    provider_usage,
)

pytestmark = [
    # Building workflow agents touches pydantic's deprecated attributes (see test_agents).
    pytest.mark.filterwarnings("ignore:The `__fields__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:The `__fields_set__` attribute is deprecated"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_"),
]

DOCS = [
    Document(text="Llamas are camelids from South America. They hum when they are anxious."),
    Document(text="Alpacas are smaller than llamas and are bred for their fibre."),
]


def _utf8(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


def test_each_query_is_its_own_scope_in_the_report() -> None:
    budget = allotment.Budget(usd="0.10", name="rag", prices=PRICES)
    embed = CountingEmbedding()
    llm = ScriptedLLM(max_tokens=50, replies=[("Camelids.", 400, 20), ("Fibre.", 380, 10)])
    undo = instrument(budget)
    try:
        index = VectorStoreIndex.from_documents(DOCS, embed_model=embed)
        engine = index.as_query_engine(llm=llm, similarity_top_k=1)
        engine.query("What are llamas?")
        engine.query("Why are alpacas bred?")
    finally:
        undo()
    report = budget.report()
    queries = [c for c in report.children if c.name == "query"]
    assert len(queries) == 2
    assert all(q.closed for q in queries)
    first, second = queries
    assert (first.spent.llm_calls, first.spent.input_tokens - _utf8(["What are llamas?"])) == (
        1,
        400,
    )
    assert second.spent.llm_calls == 1
    # The index build's embeddings are the run's own spend, outside any query.
    build_tokens = _utf8(embed.batches[0])
    own = report.spent.input_tokens - first.spent.input_tokens - second.spent.input_tokens
    assert own == build_tokens
    assert llm.calls == 2 == report.spent.llm_calls
    assert report.open_holds == 0


def test_embeddings_are_reserved_per_batch_and_settled_as_flagged_estimates() -> None:
    texts = ["alpha", "beta", "gamma", "delta", "epsilon"]
    budget = allotment.Budget(usd="1", name="embed", prices=PRICES)
    embed = CountingEmbedding(embed_batch_size=2, callback_manager=CallbackManager([]))
    embed.callback_manager.add_handler(BudgetCallbackHandler(budget))
    embed.get_text_embedding_batch(texts)
    assert embed.batches == [["alpha", "beta"], ["gamma", "delta"], ["epsilon"]]
    spent = budget.spent
    assert spent.input_tokens == _utf8(texts)  # fake-embed has no tokenizer: UTF-8 bytes
    assert spent.estimated
    assert spent.llm_calls == 0
    assert budget.report().estimated_calls == 3


def test_an_embedding_batch_that_does_not_fit_is_refused_before_it_is_sent() -> None:
    texts = ["a" * 40, "b" * 40, "c" * 40]
    # Room for the first batch's reservation (its text plus framing), not for the second.
    budget = allotment.Budget(input_tokens=60, name="embed", prices=PRICES)
    embed = CountingEmbedding(embed_batch_size=1)
    embed.callback_manager = CallbackManager([BudgetCallbackHandler(budget)])
    with pytest.raises(allotment.BudgetExceeded) as refused:
        embed.get_text_embedding_batch(texts)
    assert refused.value.limit_name == "input_tokens"
    assert embed.batches == [["a" * 40]]
    assert budget.spent.input_tokens == 40


async def test_async_embedding_batches_are_reserved_for_their_own_texts() -> None:
    texts = ["one", "two", "three"]
    budget = allotment.Budget(usd="1", name="embed", prices=PRICES)
    embed = CountingEmbedding(embed_batch_size=1)
    embed.callback_manager = CallbackManager([BudgetCallbackHandler(budget)])
    await embed.aget_text_embedding_batch(texts)
    assert budget.spent.input_tokens == _utf8(texts)
    assert budget.report().open_holds == 0


def test_an_unpriced_embedding_model_fails_closed_under_a_dollar_cap() -> None:
    budget = allotment.Budget(usd="1", name="embed")
    undo = instrument(budget)
    try:
        with pytest.raises(allotment.UnknownPrice, match="unknown"):
            VectorStoreIndex.from_documents(DOCS, embed_model=MockEmbedding(embed_dim=8))
    finally:
        undo()


def test_a_retrieval_on_its_own_is_a_scope() -> None:
    budget = allotment.Budget(usd="1", name="rag", prices=PRICES)
    embed = CountingEmbedding()
    index = VectorStoreIndex.from_documents(DOCS, embed_model=embed)
    undo = instrument(budget)
    try:
        nodes = index.as_retriever(similarity_top_k=1).retrieve("llamas")
    finally:
        undo()
    assert len(nodes) == 1
    retrieve = budget.report().find("retrieve")
    assert retrieve.spent.input_tokens == _utf8(["llamas"])
    assert retrieve.closed


async def test_a_query_engine_tool_is_charged_to_the_calling_agents_tool_scope(
    provider: ScriptedProvider,
) -> None:
    budget = allotment.Budget(usd="0.05", name="run", prices=PRICES)
    llm = openai_llm(provider, max_tokens=64)
    index = VectorStoreIndex.from_documents(DOCS, embed_model=CountingEmbedding())
    docs = QueryEngineTool.from_defaults(
        index.as_query_engine(llm=llm, similarity_top_k=1),
        name="docs",
        description="Answers questions about llamas.",
    )
    agent = FunctionAgent(name="helper", description="helps", llm=llm, tools=[docs])
    provider.add(
        Reply.tool_call("docs", {"input": "What are llamas?"}),
        Reply.text("They are camelids."),  # the query engine's synthesis
        Reply.text("Llamas are camelids."),
    )
    undo = instrument(budget)
    try:
        await agent.run(user_msg="What are llamas?")
    finally:
        undo()
    helper = budget.report().find("helper")
    tool = helper.find("docs")
    assert (tool.spent.llm_calls, tool.spent.input_tokens > 0) == (1, True)
    assert [c.name for c in tool.children] == []  # no separate query scope inside a tool
    assert (helper.spent.llm_calls, helper.spent.tool_calls) == (3, 1)
    report = budget.report()
    billed = provider_usage(provider)
    query_embedding = _utf8(["What are llamas?"])  # the only embedding inside the run
    assert report.spent.llm_calls == provider.calls == billed.llm_calls
    assert report.spent.output_tokens == billed.output_tokens
    assert report.spent.input_tokens - query_embedding == billed.input_tokens
    assert report.open_holds == 0


def test_a_limit_for_query_scopes_caps_each_query_on_its_own() -> None:
    budget = allotment.Budget(usd="0.10", name="rag", prices=PRICES)
    llm = ScriptedLLM(max_tokens=50, default=("Camelids.", 400, 20))
    index = VectorStoreIndex.from_documents(DOCS, embed_model=CountingEmbedding())
    engine = index.as_query_engine(llm=llm, similarity_top_k=1)
    undo = instrument(budget, children={"query": {"llm_calls": 0}})
    try:
        with pytest.raises(allotment.BudgetExceeded) as refused:
            engine.query("What are llamas?")
    finally:
        undo()
    assert refused.value.path == "rag/query"
    assert llm.calls == 0
    assert budget.report().open_holds == 0


def test_an_embedding_whose_texts_are_unseen_is_refused_once_the_budget_is_spent() -> None:
    """Custom code firing EMBEDDING events outside BaseEmbedding's methods: pre-flight only."""
    from llama_index.core.callbacks import CBEventType, EventPayload

    budget = allotment.Budget(input_tokens=100, name="embed", prices=PRICES)
    manager = CallbackManager([BudgetCallbackHandler(budget)])
    serialized = {EventPayload.SERIALIZED: {"model_name": "fake-embed"}}
    event = manager.on_event_start(CBEventType.EMBEDDING, payload=serialized)
    manager.on_event_end(CBEventType.EMBEDDING, {EventPayload.CHUNKS: ["x" * 100]}, event)
    assert budget.spent.input_tokens == 100  # settled from the chunks it reported
    with pytest.raises(allotment.BudgetExceeded):
        manager.on_event_start(CBEventType.EMBEDDING, payload=serialized)
    assert budget.report().open_holds == 0
