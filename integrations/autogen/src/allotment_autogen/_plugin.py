"""Entry-point plugin of allotment-autogen. It must not import the framework at import time."""
