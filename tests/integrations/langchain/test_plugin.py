"""The kernel loads this integration through its entry point on every budget: that must
not import LangChain (or httpx), which is for the code that uses the integration."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_entry_point_plugin_does_not_import_langchain() -> None:
    """In a fresh interpreter, building the plugin host (which loads the ``langchain``
    entry point) leaves langchain_core and httpx unimported; the first use of a name from
    allotment_langchain imports it."""
    script = textwrap.dedent(
        """
        import sys
        import allotment
        from importlib.metadata import entry_points

        assert "langchain" in {ep.name for ep in entry_points(group="allotment")}
        allotment.Budget(usd="1", name="probe")  # builds the plugin host
        assert "allotment_langchain._plugin" in sys.modules
        assert "langchain_core" not in sys.modules, "the plugin imported LangChain"
        assert "httpx" not in sys.modules
        import allotment_langchain
        allotment_langchain.BudgetCallbackHandler
        assert "langchain_core" in sys.modules
        assert sorted(dir(allotment_langchain)) == sorted(allotment_langchain.__all__)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
