"""Test doubles for crews: a scripted ``crewai.BaseLLM`` that reports usage like CrewAI's
own providers. Importing this module imports CrewAI."""

from ._llm import LLMRequest, ScriptedLLM

__all__ = ["LLMRequest", "ScriptedLLM"]
