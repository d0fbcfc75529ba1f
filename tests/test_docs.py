"""Every public name of the library has a docstring with a summary line."""

import importlib
import inspect
import pkgutil

import pytest

import hypergrad

MODULES = sorted(m.name for m in pkgutil.walk_packages(hypergrad.__path__, "hypergrad."))


def public_names(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                yield f"{name}.{attr}", member


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} has no module docstring"
    missing = [n for n, obj in public_names(module) if not (obj.__doc__ or "").strip()]
    assert not missing, f"{name}: no docstring for {', '.join(missing)}"
