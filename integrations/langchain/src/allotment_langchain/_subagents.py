"""Recognising sub-agents in LangChain's run tree, from what callbacks are told."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

METADATA_KEY = "allotment"
"""Run metadata ``{"allotment": {"agent": "researcher", "limits": "0.10"}}`` names a
sub-agent explicitly (``limits`` is optional)."""

_DEFAULT_GRAPH_NAME = "LangGraph"


def marker_of(metadata: Mapping[str, Any] | None) -> tuple[str | None, object]:
    """The sub-agent name and limits given in run metadata, if any."""
    if not metadata:
        return None, None
    entry = metadata.get(METADATA_KEY)
    if isinstance(entry, str):
        return budget_name(entry), None
    if isinstance(entry, Mapping):
        agent = entry.get("agent")
        if isinstance(agent, str) and agent.strip():
            return budget_name(agent), entry.get("limits")
    return None, None


def task_depth(metadata: Mapping[str, Any] | None) -> int:
    """How many LangGraph namespaces deep a run is: 0 outside graph nodes, 1 in a node of a
    top-level graph, 2 in a node of a graph run inside that node, and so on."""
    if not metadata:
        return 0
    ns = metadata.get("langgraph_checkpoint_ns")
    if not isinstance(ns, str) or not ns:
        return 0
    return ns.count("|") + 1


def node_of(metadata: Mapping[str, Any] | None) -> str | None:
    """The LangGraph node a run is in."""
    node = (metadata or {}).get("langgraph_node")
    return node if isinstance(node, str) and node else None


def subgraph_name(graph_run_name: str, node: str | None) -> str:
    """A subgraph's name: the graph's own name (``compile(name=...)``), else the node of
    the parent graph that runs it."""
    if graph_run_name and graph_run_name != _DEFAULT_GRAPH_NAME:
        return budget_name(graph_run_name)
    return budget_name(node) if node else "subgraph"


def budget_name(name: str) -> str:
    """``name`` made a valid budget name ('/' and '#' are the tree's separators)."""
    cleaned = name.strip().replace("/", "_").replace("#", "_")
    return cleaned or "agent"
