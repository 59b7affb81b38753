"""Entry-point plugin of allotment-autogen. It must not import the framework at import time.

The integration needs no kernel hook of its own: it is a client wrapper, a runtime
intervention handler and ``instrument()``, all loaded from ``allotment_autogen`` when used.
Loading this module announces the integration to the plugin host (``allotment`` lists it)
and costs nothing.
"""
