"""Every public class, method and type of the official SDK 0.38.0 has a compatible tinkex counterpart.

"Compatible": the same name; a method is async exactly when the official one is; every official
parameter exists with the same kind (positional order kept) and, where it has a default, ours has the
same default; any extra parameter of ours is optional. Deliberate differences are listed below and in
the README (Deliberate differences).
"""

from __future__ import annotations

import dataclasses
import inspect

import pydantic
import pytest
import tinker
import tinker.types

import tinkex
import tinkex.types

CLIENT_CLASSES = ["ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "AdminClient", "APIFuture",
                  "BackcompatTrainingClientFuture", "BackcompatSamplingClientFuture", "LossHandle"]
DUNDERS = {"__init__", "__reduce__", "__await__", "__enter__", "__exit__"}

# Deliberate differences (also in the README (Deliberate differences)). Keys are "Class.method" or "types.Name.field".
DELIBERATE = {
    # The official model names this field optim_params (serialised as adam_params / optimizer_params);
    # tinkex names it after the wire and accepts optim_params and optimizer_params as aliases.
    "types.OptimStepRequest.optim_params",
}


_MISSING = object()


def _unwrap(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _public_members(cls):
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in DUNDERS:
            continue
        yield name, value


def _function(value):
    return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def _problems(official_cls, ours_cls) -> list[str]:
    problems = []
    for name, value in _public_members(official_cls):
        where = f"{official_cls.__name__}.{name}"
        if where in DELIBERATE:
            continue
        ours = inspect.getattr_static(ours_cls, name, _MISSING)
        if ours is _MISSING:
            problems.append(f"{where}: missing")
            continue
        if isinstance(value, property):
            continue
        official_fn, ours_fn = _function(value), _function(ours)
        if not callable(official_fn):
            continue
        if isinstance(value, staticmethod) != isinstance(ours, staticmethod):
            problems.append(f"{where}: staticmethod mismatch")
        if inspect.iscoroutinefunction(_unwrap(official_fn)) != inspect.iscoroutinefunction(_unwrap(ours_fn)):
            problems.append(f"{where}: async mismatch")
        try:
            theirs_sig, ours_sig = inspect.signature(official_fn), inspect.signature(ours_fn)
        except ValueError:
            continue
        theirs_params, ours_params = theirs_sig.parameters, ours_sig.parameters
        ours_takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in ours_params.values())
        for pname, p in theirs_params.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            q = ours_params.get(pname)
            if q is None:
                if not ours_takes_kwargs:
                    problems.append(f"{where}: parameter {pname!r} missing")
                continue
            if p.kind != q.kind:
                problems.append(f"{where}: parameter {pname!r} is {q.kind.name}, official {p.kind.name}")
            if p.default is not p.empty and q.default != p.default:
                problems.append(f"{where}: parameter {pname!r} default {q.default!r}, official {p.default!r}")
        for pname, q in ours_params.items():
            if pname not in theirs_params and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL,
                                                                                      q.VAR_KEYWORD):
                problems.append(f"{where}: extra required parameter {pname!r}")
        positional = [n for n, p in theirs_params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        ours_positional = [n for n, p in ours_params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if ours_positional[:len(positional)] != positional:
            problems.append(f"{where}: positional parameters {ours_positional}, official {positional}")
    return problems


def test_top_level_exports():
    missing = [name for name in tinker.__all__ if not hasattr(tinkex, name)]
    assert missing == []
    for name in ("TinkerError", "APIError", "APIStatusError", "APIConnectionError", "APITimeoutError",
                 "APIResponseValidationError", "RequestFailedError", "BadRequestError", "AuthenticationError",
                 "BillingError", "PermissionDeniedError", "NotFoundError", "ConflictError", "UnprocessableEntityError",
                 "RateLimitError", "InternalServerError"):
        official, ours = getattr(tinker, name), getattr(tinkex, name)
        # The same hierarchy: each official base class has its tinkex twin as a base.
        official_bases = {b.__name__ for b in official.__mro__ if b.__module__.startswith("tinker")}
        ours_bases = {b.__name__ for b in ours.__mro__ if b.__module__.startswith("tinkex")}
        assert official_bases <= ours_bases, name


@pytest.mark.parametrize("name", CLIENT_CLASSES)
def test_client_classes_have_compatible_methods(name):
    assert _problems(getattr(tinker, name), getattr(tinkex, name)) == []


def test_retry_config_fields():
    from tinker.lib.retry_handler import RetryConfig as Official

    ours = {f.name: f.default for f in dataclasses.fields(tinkex.RetryConfig)}
    for field in dataclasses.fields(Official):
        assert field.name in ours
        if field.name != "retryable_exceptions":
            assert ours[field.name] == field.default


def _fields(cls):
    if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
        return set(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return None


def test_every_official_type_exists_with_its_fields():
    problems = []
    for name in dir(tinker.types):
        if name.startswith("_") or not name[0].isupper():
            continue
        if not hasattr(tinkex.types, name):
            problems.append(f"types.{name}: missing")
            continue
        theirs = _fields(getattr(tinker.types, name))
        if theirs is None:
            continue
        ours_cls = getattr(tinkex.types, name)
        for field in sorted(theirs):
            if field.startswith("_") or f"types.{name}.{field}" in DELIBERATE:
                continue
            if not hasattr(ours_cls, field) and field not in (_fields(ours_cls) or set()):
                problems.append(f"types.{name}.{field}: missing")
    assert problems == []


def test_core_types_behave_alike():
    """The helpers users call on the common types give the same answers."""
    import numpy as np

    for module in (tinker, tinkex):
        model_input = module.ModelInput.from_ints([1, 2, 3]).append_int(4)
        assert model_input.to_ints() == [1, 2, 3, 4] and model_input.length == 4
        tensor = module.TensorData.from_numpy(np.array([[1.0, 2.0]], dtype=np.float64))
        assert tensor.dtype == "float32" and tensor.shape == [1, 2]
        assert tensor.to_numpy().tolist() == [[1.0, 2.0]]
        params = module.SamplingParams(max_tokens=3)
        assert (params.temperature, params.top_k, params.top_p) == (1, -1, 1)
        adam = module.AdamParams()
        assert (adam.learning_rate, adam.beta1, adam.beta2, adam.eps) == (1e-4, 0.9, 0.95, 1e-12)
        parsed = module.ParsedCheckpointTinkerPath.from_tinker_path("tinker://s:train:0/weights/step-1")
        assert (parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id) == \
            ("s:train:0", "training", "weights/step-1")
