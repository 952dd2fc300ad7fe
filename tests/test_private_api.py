"""The private API bt_trl touches (bt_trl/core/private_api.py) is still there, with the parameters bt_trl uses."""

import importlib
import inspect
from functools import reduce

import pytest

from bt_trl.core.private_api import PRIVATE_API


@pytest.mark.parametrize("path", sorted(PRIVATE_API))
def test_private_attribute_is_still_there(path):
    module_name, qualified_name = path.split(":")
    module = importlib.import_module(module_name)
    try:
        attribute = reduce(getattr, qualified_name.split("."), module)
    except AttributeError:
        pytest.fail(f"{path} is gone: bt_trl relies on it ({PRIVATE_API[path][1]})")
    parameters, why = PRIVATE_API[path]
    if parameters is None:
        return
    assert tuple(inspect.signature(attribute).parameters)[: len(parameters)] == parameters, (
        f"{path} changed its parameters: bt_trl relies on {parameters} ({why})")


def test_bt_trl_overrides_only_listed_private_methods():
    """Every private method a bt_trl subclass overrides (or defines over a base class's) is in the list."""
    from bt_trl.callbacks import BetterTogetherCallback
    from bt_trl.steps.bootstrap import BatchedBootstrapFewShot
    from bt_trl.steps.random_search import ConcurrentRandomSearch
    from bt_trl.trainer import BetterTogetherTrainer

    listed = {path.split(":")[1].split(".")[-1] for path in PRIVATE_API}
    for cls in (BetterTogetherTrainer, BetterTogetherCallback, BatchedBootstrapFewShot, ConcurrentRandomSearch):
        for name in vars(cls):
            overridden = name.startswith("_") and not name.startswith("__") and any(
                hasattr(base, name) for base in cls.__mro__[1:])
            assert not overridden or name in listed, f"{cls.__name__}.{name} overrides a private attribute"
