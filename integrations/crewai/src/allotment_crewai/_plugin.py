"""Entry-point plugin of allotment-crewai. It must not import the framework at import time."""
