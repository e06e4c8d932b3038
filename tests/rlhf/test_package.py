"""The lazy public names of rlhf_fast and rlhf_fast.rlhf (one helper, rlhf_fast._lazy, serves both)."""
import importlib

import pytest

import rlhf_fast
import rlhf_fast.rlhf


@pytest.mark.parametrize("package", [rlhf_fast, rlhf_fast.rlhf], ids=lambda p: p.__name__)
def test_public_names_resolve_to_their_modules(package):
    for name in package.__all__:
        value = getattr(package, name)
        if name in package._LAZY:
            assert value is getattr(importlib.import_module(package._LAZY[name]), name), name
        assert name in dir(package), name
    with pytest.raises(AttributeError, match=rf"^module '{package.__name__}' has no attribute 'no_such_name'$"):
        package.no_such_name
