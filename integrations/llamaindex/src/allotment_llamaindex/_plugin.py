"""Entry-point plugin of allotment-llamaindex. It must not import the framework at import time.

It implements no hook: the integration is a callback handler users attach (or
``instrument()``), not a policy. The entry point lets ``allotment`` list it as installed.
"""
