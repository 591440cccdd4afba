"""`install_as_tinker()`: make `import tinker` (and the few submodules tinker-cookbook imports
from) resolve to Stillroom's SDK, so code written for Tinker runs unchanged over Stillroom's gRPC.

It only registers module aliases in `sys.modules`; it knows nothing of the calls themselves.
"""

from __future__ import annotations

import sys
import types as _modules

# Submodule paths Tinker code imports from, and the Stillroom module that holds those names.
_SUBMODULES = {
    "tinker.types": "stillroom.types",
    "tinker.types.tensor_data": "stillroom.types",
    "tinker.types.checkpoint": "stillroom.types",
    "tinker.lib.public_interfaces": "stillroom",
    "tinker.lib.public_interfaces.rest_client": "stillroom.rest_client",
    "tinker.lib.public_interfaces.api_future": "stillroom.futures",
}


def install_as_tinker() -> None:
    """Alias `tinker` to `stillroom` in `sys.modules`. Call it before anything imports tinker;
    if the real `tinker` package was imported already, this refuses rather than mixing the two."""
    import stillroom

    current = sys.modules.get("tinker")
    if current is stillroom:
        return
    if current is not None:
        raise RuntimeError("install_as_tinker: the tinker package is already imported; call "
                           "install_as_tinker() before anything imports tinker")
    sys.modules["tinker"] = stillroom
    lib = _modules.ModuleType("tinker.lib", "Stillroom's stand-in for tinker.lib")
    sys.modules["tinker.lib"] = lib
    for alias, target in _SUBMODULES.items():
        __import__(target)
        sys.modules[alias] = sys.modules[target]
    lib.__dict__["public_interfaces"] = sys.modules["tinker.lib.public_interfaces"]
