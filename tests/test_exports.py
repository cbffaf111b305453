"""The public surface is exactly what natrio/__init__ exports, and all of it is documented."""

from __future__ import annotations

import natrio


def test_all_names_exist_and_have_docstrings() -> None:
    for name in natrio.__all__:
        obj = getattr(natrio, name)
        if name in ("__version__", "converter"):
            continue
        assert obj.__doc__, f"natrio.{name} has no docstring"


def test_no_private_module_leaks_into_all() -> None:
    public = {n for n in dir(natrio) if n.isidentifier() and not n.startswith("_")}
    modules = {name for name in public if type(getattr(natrio, name)).__name__ == "module"}
    # Submodules imported as a side effect are not part of the surface, except the plugin.
    assert set(natrio.__all__) - {"__version__"} == public - modules
    assert modules <= {"testing", "middleware"}
