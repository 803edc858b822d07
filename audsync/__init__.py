"""audsync: keep Gleap contacts in step with audiences and traits defined as SQL.

The public surface is the ``audsync`` command (:mod:`audsync.cli`), the config
format (:mod:`audsync.config`), the history tables (:mod:`audsync.models`), the
exception tree (:mod:`audsync.errors`) and the names in ``__all__`` below: what
the command does, callable from Python (README, "Driving a sync from Python")::

    import audsync

    config = audsync.load_config("audsync.toml")
    outcome = audsync.run_sync(config, ["vip"], wait=True)

Each name is imported on first use, so ``import audsync`` (and so ``audsync
--help``) does not pay for the HTTP client, the scheduler and the planner.
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # what typing.TYPE_CHECKING is, without importing typing

__version__ = "0.1.0"

_HOMES = {
    "load_config": "audsync.config",
    "Config": "audsync.config",
    "Definition": "audsync.config",
    "Secret": "audsync.config",
    "run_sync": "audsync.sync",
    "retry_failed": "audsync.sync",
    "SyncOutcome": "audsync.sync",
    "PlanResult": "audsync.plan",
    "DeliveryReport": "audsync.deliver",
    "forget": "audsync.forget",
    "ForgetReport": "audsync.forget",
    "verify": "audsync.readback:run_verify",
    "VerifyReport": "audsync.readback",
    "RepairOutcome": "audsync.readback",
    "Daemon": "audsync.service",
    "status": "audsync.status",
    "Status": "audsync.status",
    "check": "audsync.check",
    "Check": "audsync.check",
    "AudsyncError": "audsync.errors",
    "ConfigError": "audsync.errors",
    "SourceError": "audsync.errors",
    "StateError": "audsync.errors",
    "StateMoved": "audsync.errors",
    "DriverMissing": "audsync.errors",
    "LeaseHeld": "audsync.errors",
    "LeaseLost": "audsync.errors",
    "Interrupted": "audsync.errors",
    "CallAbandoned": "audsync.errors",
    "GleapError": "audsync.errors",
    "GleapAuthError": "audsync.errors",
    "GleapUnavailable": "audsync.errors",
    "GleapRejectingAll": "audsync.errors",
}
"""Where each public name lives: ``module`` or ``module:name`` when it is named otherwise there."""

__all__ = [
    "AudsyncError",
    "CallAbandoned",
    "Check",
    "Config",
    "ConfigError",
    "Daemon",
    "Definition",
    "DeliveryReport",
    "DriverMissing",
    "ForgetReport",
    "GleapAuthError",
    "GleapError",
    "GleapRejectingAll",
    "GleapUnavailable",
    "Interrupted",
    "LeaseHeld",
    "LeaseLost",
    "PlanResult",
    "RepairOutcome",
    "Secret",
    "SourceError",
    "StateError",
    "StateMoved",
    "Status",
    "SyncOutcome",
    "VerifyReport",
    "__version__",
    "check",
    "forget",
    "load_config",
    "retry_failed",
    "run_sync",
    "status",
    "verify",
]

if TYPE_CHECKING:
    from typing import Any

    from audsync.check import Check, check
    from audsync.config import Config, Definition, Secret, load_config
    from audsync.deliver import DeliveryReport
    from audsync.errors import (
        AudsyncError,
        CallAbandoned,
        ConfigError,
        DriverMissing,
        GleapAuthError,
        GleapError,
        GleapRejectingAll,
        GleapUnavailable,
        Interrupted,
        LeaseHeld,
        LeaseLost,
        SourceError,
        StateError,
        StateMoved,
    )
    from audsync.forget import ForgetReport, forget
    from audsync.plan import PlanResult
    from audsync.readback import RepairOutcome, VerifyReport
    from audsync.readback import run_verify as verify
    from audsync.service import Daemon
    from audsync.status import Status, status
    from audsync.sync import SyncOutcome, retry_failed, run_sync


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'audsync' has no attribute {name!r}")
    module, _, attribute = home.partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, whose public names stay what ``__all__`` promises.

    Loading a submodule binds its name on the package: ``audsync.forget`` the
    module would hide ``audsync.forget`` the function as soon as anything imported
    :mod:`audsync.forget` (so too ``check``, ``status`` and ``verify``). A public
    name is never rebound to a module; ``from audsync.forget import ...`` still works.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
