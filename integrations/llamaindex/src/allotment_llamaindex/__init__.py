"""allotment for llamaindex."""
