"""Entry-point plugin of allotment-langchain. It must not import the framework at import time.

The integration needs no kernel hook: it is a LangChain callback handler that calls the
budget API. This module exists so the kernel's plugin host lists the integration (and so
a future hook, say a default child-limits policy for LangGraph subgraphs, has a home)
without importing langchain when allotment starts.
"""
