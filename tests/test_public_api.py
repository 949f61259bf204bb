"""Every module declares its public names in ``__all__``, and they exist."""
from __future__ import annotations

import importlib
import pkgutil

import pytest

import mailoutbox

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(mailoutbox.__path__, "mailoutbox.")
    if not info.name.rsplit(".", 1)[-1].startswith("_")
)


def test_the_package_has_modules():
    assert "mailoutbox.queue" in MODULES and "mailoutbox.sending" in MODULES


@pytest.mark.parametrize("name", ["mailoutbox", *MODULES])
def test_all_names_exist(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, (list, tuple)), name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []
