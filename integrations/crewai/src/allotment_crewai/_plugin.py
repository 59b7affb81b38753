"""Entry-point plugin of allotment-crewai. It must not import the framework at import time.

The integration has no kernel hooks of its own to add: its work is done by CrewAI hooks
that ``crew_config``, ``budgeted`` and ``instrument`` install. The entry point makes it
discoverable (``allotment.plugins()``), and ``allotment.demos`` names its demo.
"""
