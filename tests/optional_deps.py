# Optional test dependencies (torchvision, timm, matplotlib, ...): `make test` installs them where it can, and
# a test that needs one skips, saying why, where it is absent or does not import.
import importlib

import pytest


def optional_import(name):
    """(the module, None) when `name` imports, else (None, why not)."""
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, f"{name} is not installed"
    except Exception as err:  # installed but broken, e.g. a torchvision built for another torch
        first_line = (str(err).splitlines() or [""])[0]
        return None, f"{name} does not import: {type(err).__name__}: {first_line}"


def requires(name):
    """A skipif mark for tests that need the optional package `name`."""
    module, why = optional_import(name)
    return pytest.mark.skipif(module is None, reason=why or "")
