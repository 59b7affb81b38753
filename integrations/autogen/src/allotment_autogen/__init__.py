"""allotment for autogen."""
