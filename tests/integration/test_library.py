"""audsync as a library: the README's example runs against the sandbox, the declared
surface resolves, and ``import audsync`` stays cheap."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import audsync
from audsync.sandbox import Sandbox
from tests.helpers import Warehouse, seed, source_mismatches

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The first Python block under "Driving a sync from Python"."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Driving a sync from Python", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the README section has no python example"
    return found.group(1)


def test_the_readme_example_syncs_through_the_sandbox(
    make_config: Any,
    gleap: Sandbox,
    warehouse: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(warehouse, 30)
    make_config()  # tmp_path/audsync.toml: the file the example loads
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)

    outcome = namespace["outcome"]
    assert isinstance(outcome, audsync.SyncOutcome)
    assert not outcome.failed
    assert {p.key for p in outcome.plans} == {"vip_customers", "buyers", "revenue"}
    assert all(p.mode == "initial" for p in outcome.plans)
    assert isinstance(outcome.delivery, audsync.DeliveryReport)
    assert outcome.delivery.delivered > 0 and outcome.delivery.failed == 0
    assert source_mismatches(gleap, warehouse) == []
    status = namespace["status"]
    assert isinstance(status, audsync.Status)
    assert status.pending_users == 0
    assert [a.key for a in status.audiences] == ["buyers", "revenue", "vip_customers"]
    out = capsys.readouterr().out
    assert f"{outcome.delivery.delivered} changes delivered, 0 failed" in out
    assert "0 users wait for delivery" in out


def test_check_returns_what_the_command_prints(
    make_config: Any, warehouse: Warehouse, gleap: Sandbox
) -> None:
    seed(warehouse, 12)
    _, config = make_config()
    found = audsync.check(config)
    assert isinstance(found, audsync.Check)
    assert found.ok and found.token_problem is None
    assert [(q.key, q.rows, q.problem) for q in found.queries] == [
        ("vip_customers", 4, None),
        ("buyers", 6, None),
        ("revenue", 10, None),
    ]
    assert found.next_sync is not None
    assert found.next_sync.calls == 11  # one per user in any audience or trait (u5 is in none)
    assert gleap.contacts() == {}  # a check sends no Identify call


def test_every_declared_name_resolves() -> None:
    for name in audsync.__all__:
        assert getattr(audsync, name) is not None, name
    errors = [getattr(audsync, n) for n in audsync.__all__ if n.endswith("Error")]
    assert all(issubclass(e, audsync.AudsyncError) for e in errors)


def test_a_submodule_of_the_same_name_does_not_hide_a_function() -> None:
    import audsync.check
    import audsync.forget
    import audsync.status
    import audsync.verify

    for name in ("check", "forget", "status", "verify"):
        assert isinstance(getattr(audsync, name), types.FunctionType), name


def test_import_audsync_loads_neither_the_database_layer_nor_http() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, audsync; print(sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('sqlalchemy', 'httpx', 'apscheduler')"
            " or m.startswith('audsync.')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"
