"""Structural rules of the package: exception hierarchy, options, runtime ownership, typed seams."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import phx_gevent
from phx_gevent.errors import PhxError


def _modules():
    for info in pkgutil.walk_packages(phx_gevent.__path__, "phx_gevent."):
        if info.name.endswith("__main__"):
            continue  # running it would parse the test runner's argv
        yield importlib.import_module(info.name)


def test_every_public_library_exception_derives_from_phx_error():
    found = []
    for module in _modules():
        for name, value in vars(module).items():
            if name.startswith("_") or not inspect.isclass(value) or not issubclass(value, BaseException):
                continue
            if not value.__module__.startswith("phx_gevent"):
                continue  # re-exported builtins
            found.append(value)
            assert issubclass(value, PhxError), f"{value.__module__}.{name} does not derive from PhxError"
    names = {cls.__name__ for cls in found}
    assert {"EncodeError", "DecodeError", "ProtocolError", "EnvelopeError", "ParamsError"} <= names


@pytest.mark.parametrize(
    ("path", "base"),
    [
        ("phx_gevent.serializers.EncodeError", ValueError),
        ("phx_gevent.serializers.DecodeError", ValueError),
        ("phx_gevent.pubsub.codec.EnvelopeError", ValueError),
        ("phx_gevent.transports.http.ParamsError", ValueError),
        ("phx_gevent.errors.CallbackReturnError", TypeError),
        ("phx_gevent.testing.ConnectRefused", AssertionError),
    ],
)
def test_exceptions_keep_the_builtin_base_applications_catch(path, base):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, base) and issubclass(cls, PhxError)


def test_push_with_a_list_payload_raises_encode_error_as_documented():
    from phx_gevent.serializers import EncodeError, V2JSONSerializer

    with pytest.raises(EncodeError):
        V2JSONSerializer().encode_push("1", "room:1", "e", [1, 2])
