"""Entry-point plugin of allotment-llamaindex. It must not import the framework at import time."""
