"""Entry-point plugin of allotment-langchain. It must not import the framework at import time."""
