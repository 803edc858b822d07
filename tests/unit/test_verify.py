"""The pure parts of ``audsync verify``: sampling, comparing, the Wilson interval; and
its configuration."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from audsync.config import Secret, parse_config
from audsync.errors import ConfigError
from audsync.gleap_read import parse_answer
from audsync.verify import (
    ABSENT,
    NO_CONTACT,
    Expected,
    compare_user,
    held_fields,
    reads_look_misdirected,
    reservoir_sample,
    same_value,
    summarise,
    wilson,
)


@pytest.mark.parametrize(
    ("drifted", "checked", "low", "high"),
    [
        # Reference values (Wilson score interval, z = 1.96).
        (0, 400, 0.0, 0.00952),
        (4, 400, 0.00390, 0.02542),
        (50, 100, 0.40383, 0.59617),
        (1, 10, 0.01788, 0.40415),
        (10, 10, 0.72246, 1.0),
        (0, 1, 0.0, 0.79346),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_interval(drifted: int, checked: int, low: float, high: float) -> None:
    got = wilson(drifted, checked)
    assert got[0] == pytest.approx(low, abs=5e-5)
    assert got[1] == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(
    ("expected", "held", "same"),
    [
        (True, True, True),
        (True, False, False),
        (True, ABSENT, False),
        (False, ABSENT, False),
        (True, 1, False),  # never a number for a boolean
        (1, True, False),
        (450, 450.0, True),
        (450.5, 450.25, False),
        ("gold", "gold", True),
        ("gold", "Gold", False),
        ("42", 42, False),
        (None, None, True),
        (None, ABSENT, True),  # Gleap may drop a null attribute
        (None, 0, False),
        (0, None, False),
        ("2022-09-28T10:11:18.156Z", "2022-09-28T10:11:18.156+00:00", True),
        ("2022-09-28T10:11:18.156Z", "2022-09-28T10:11:18.157Z", False),
        ("2022-09-28", "2022-09-28T00:00:00Z", False),  # a date is text, not an instant
        (
            {"page": "/a", "date": "2022-09-28T10:00:00.000Z"},
            {"page": "/a", "date": "2022-09-28T10:00:00Z", "x": 1},
            True,
        ),
        ({"page": "/a"}, {"page": "/b"}, False),
    ],
)
def test_same_value(expected: Any, held: Any, same: bool) -> None:
    assert same_value(expected, held) is same


def test_held_fields_merges_custom_data_and_known_fields() -> None:
    answer = {
        "userId": "1",
        "email": "a@b.c",
        "id": "internal",
        "customData": {"vip": True, "testType": "x"},
    }
    assert held_fields(answer) == {"email": "a@b.c", "vip": True, "testType": "x"}
    assert held_fields({"userId": "1"}) == {}


def E(key: str, value: Any, **kw: Any) -> Expected:
    return Expected(key=key, value=value, **kw)


@pytest.mark.parametrize(
    ("expected", "contact", "drifts"),
    [
        ([E("vip", True)], {"customData": {"vip": True}}, []),
        ([E("vip", True)], {"customData": {"vip": False}}, [("vip", None, True, False)]),
        ([E("vip", True)], {"customData": {}}, [("vip", None, True, ABSENT)]),
        (
            [E("vip", True), E("rev", 3)],
            None,
            [("vip", None, True, NO_CONTACT), ("rev", None, 3, NO_CONTACT)],
        ),
        # A change in flight: Gleap may hold the queued value already.
        ([E("vip", True, pending=(False,))], {"customData": {"vip": False}}, []),
        ([E("vip", True, pending=(False,))], {"customData": {}}, [("vip", None, True, ABSENT)]),
        # Contact fields from the contact ledger: known fields at the top level.
        (
            [E("vip", True, contact={"email": "a@x"})],
            {"email": "a@x", "customData": {"vip": True}},
            [],
        ),
        (
            [E("vip", True, contact={"email": "a@x", "tier": "gold"})],
            {"email": "b@x", "customData": {"vip": True}},
            [("vip", "email", "a@x", "b@x"), ("vip", "tier", "gold", ABSENT)],
        ),
        # Fields Gleap moves by itself never drift.
        (
            [E("vip", True, contact={"lastActivity": "2020-01-01T00:00:00.000Z"})],
            {"lastActivity": "2024-01-01T00:00:00Z", "customData": {"vip": True}},
            [],
        ),
        # A key that is never sent itself (@contacts): only its fields count.
        (
            [E("@contacts", None, send_value=False, contact={"plan": "pro"})],
            {"plan": "pro", "customData": {}},
            [],
        ),
        (
            [E("@contacts", None, send_value=False, contact={"plan": "pro"})],
            {"plan": "free"},
            [("@contacts", "plan", "pro", "free")],
        ),
    ],
)
def test_compare_user(
    expected: list[Expected], contact: Any, drifts: list[tuple[Any, ...]]
) -> None:
    got = compare_user("u1", expected, contact)
    assert [(d.key, d.field, d.ledger, d.gleap) for d in got] == drifts
    assert all(d.user_id == "u1" for d in got)


def test_summarise_counts_users_and_audiences() -> None:
    checked = {
        "1": [E("vip", True), E("rev", 3)],
        "2": [E("vip", True)],
        "3": [E("rev", 5)],
        "4": [E("vip", False)],
    }
    contacts: dict[str, Any] = {
        "1": None,  # missing: drift on both keys
        "2": {"customData": {"vip": True}},
        "3": {"customData": {"rev": 6}},
        # "4" was not read (a failed read): left out entirely
    }
    s = summarise(checked, contacts, ["vip", "rev"])
    assert (s.checked, s.drifted, s.missing) == (3, 2, 1)
    assert s.drift_rate == pytest.approx(2 / 3)
    vip, rev = s.by_audience["vip"], s.by_audience["rev"]
    assert (vip.checked, vip.drifted, vip.missing) == (2, 1, 1)
    assert (rev.checked, rev.drifted, rev.missing) == (2, 2, 1)
    worst = s.worst(10)
    assert [(d.user_id, d.key) for d in worst] == [("1", "rev"), ("1", "vip"), ("3", "rev")]
    assert len(s.worst(1)) == 1


def test_reservoir_sample_takes_everyone_when_n_covers_the_ledger() -> None:
    kept, seen = reservoir_sample(iter(["a", "b", "c"]), 5, random.Random(1))
    assert sorted(kept) == ["a", "b", "c"] and seen == 3
    kept, seen = reservoir_sample(iter([]), 5, random.Random(1))
    assert kept == [] and seen == 0


def test_reservoir_sample_is_uniform() -> None:
    # 20 items, samples of 5, 20,000 draws: each item is drawn 5,000 times expected
    # (sd ~61); a biased reservoir (e.g. favouring the first items) is far outside.
    rng = random.Random(7)
    counts: Counter[str] = Counter()
    for _ in range(20_000):
        kept, seen = reservoir_sample((str(i) for i in range(20)), 5, rng)
        assert len(kept) == 5 == len(set(kept)) and seen == 20
        counts.update(kept)
    assert len(counts) == 20
    assert all(abs(n - 5000) < 400 for n in counts.values()), counts


@pytest.mark.parametrize(
    ("answered", "missing", "misdirected"),
    [(0, 0, False), (19, 19, False), (20, 20, True), (400, 400, True), (400, 399, False)],
)
def test_reads_look_misdirected(answered: int, missing: int, misdirected: bool) -> None:
    assert reads_look_misdirected(answered, missing) is misdirected


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"userId": "u1", "customData": {"vip": true}}', None),
        (b'{"customData": {}}', None),
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a contact object"),
        (b'{"userId": "u2"}', "another userId"),
        (b'{"userId": "u1", "customData": [1]}', "customData is not an object"),
    ],
)
def test_parse_answer(body: bytes, problem: str | None) -> None:
    result = parse_answer("u1", body)
    if problem is None:
        assert result.ok and result.contact is not None
    else:
        assert not result.ok and result.error is not None and problem in result.error


def config(
    gleap: dict[str, Any] | None = None, env: dict[str, str] | None = None, **raw: Any
) -> Any:
    return parse_config({"gleap": gleap or {}, **raw}, env or {}, "audsync.toml")


def test_read_config_defaults_and_env() -> None:
    c = config()
    assert c.gleap.read_token is None and c.gleap.project is None
    assert c.gleap.read_rate_limit == 1000
    assert (c.verify.sample_per_run, c.verify.max_drift, c.verify.repair) == (0, 0.01, False)
    c = config(
        env={
            "AUDSYNC_GLEAP_READ_TOKEN": " key\r\n",
            "AUDSYNC_GLEAP_PROJECT": "p1",
            "AUDSYNC_GLEAP_READ_RATE_LIMIT": "50",
            "AUDSYNC_VERIFY_SAMPLE_PER_RUN": "25",
            "AUDSYNC_VERIFY_MAX_DRIFT": "0",
            "AUDSYNC_VERIFY_REPAIR": "true",
        }
    )
    assert c.gleap.read_token == Secret("key") and "key" not in repr(c.gleap)
    assert c.require_reader() == ("key", "p1")
    assert c.gleap.read_rate_limit == 50
    assert (c.verify.sample_per_run, c.verify.max_drift, c.verify.repair) == (25, 0.0, True)


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"gleap": {"read_rate_limit": 0}}, "gleap.read_rate_limit", "positive"),
        ({"gleap": {"read_token": 5}}, "gleap.read_token", "must be a string"),
        ({"gleap": {"project": "a b\x01"}}, "gleap.project", "control character"),
        ({"verify": {"max_drift": 1.5}}, "verify.max_drift", "[0, 1]"),
        ({"verify": {"sample_per_run": -1}}, "verify.sample_per_run", ">= 0"),
        ({"verify": {"repair": "maybe"}}, "verify.repair", "true or false"),
        ({"verify": {"bogus": 1}}, "verify.bogus", "unknown key"),
    ],
)
def test_bad_read_config(raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, {}, "audsync.toml")
    assert err.value.key == key and message in err.value.problem


def test_require_reader_names_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="AUDSYNC_GLEAP_READ_TOKEN"):
        config().require_reader()
    with pytest.raises(ConfigError, match="AUDSYNC_GLEAP_PROJECT"):
        config({"read_token": "k"}).require_reader()
