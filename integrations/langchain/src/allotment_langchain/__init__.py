"""allotment for langchain."""
