"""Chaos scenarios: the TOML format, its validation and the duration parser.

A scenario file describes one situation (a merchant, its terminals, a workload, faults and
what is expected); :func:`load` turns it into a frozen :class:`Scenario` or raises
:class:`ScenarioError` naming the file, the key and what to write instead. Unknown keys are
errors (a typo must not silently disable a fault). The format is documented, key by key, in
``docs/scenarios.md``.

Durations are strings such as ``"90s"``, ``"30m"``, ``"1h30m"``, ``"2d"`` or ``"250ms"``
(:func:`parse_duration_ms`); a clock skew ``offset`` may be negative (``"-7m"``). Money is a
decimal string in the merchant currency (``"300.00"``), never a float.
"""

from __future__ import annotations

import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from syncengine.core.errors import ConfigError, MoneyError
from syncengine.core.money import Money
from syncengine.core.policy.acceptance import Region
from syncengine.core.policy.expiry import DeviceClass
from syncengine.core.policy.limits import limit_maxima

DURATION_MS_MAX = 30 * 24 * 3_600_000  # a scenario longer than 30 days is a typo
TERMINALS_COUNT_MAX = 200
FAULTS_COUNT_MAX = 200
PAYMENTS_PER_HOUR_MAX = 3_600
OPERATOR_DELAY_MS_DEFAULT = 30_000
SETTLE_MS_DEFAULT = 15 * 60_000  # liveness: every payment final this long after healing
AUTO_AFTER_MS_DEFAULT = 60_000
VOID_AFTER_MS_DEFAULT = 2 * 60_000  # the operator voids this long after the approval

_UNIT_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_UNIT_ORDER = ["d", "h", "m", "s", "ms"]
_PART_RE = re.compile(r"(\d+)(ms|d|h|m|s)")

FAULT_KINDS = frozenset(
    {
        "partition",
        "provider_outage",
        "crash",
        "reboot",
        "clock_skew",
        "duplicate",
        "reorder",
        "drop",
        "delay",
        "disk_full",
        "server_crash",
        "server_restore",
        "processor_outage",
        "processor_slow",
        "outcome_unknown",
        "force_offline",
        "budget_change",
        "bug",
    }
)
#: Faults that act on each message or call with a probability.
PROBABILISTIC_KINDS = frozenset({"duplicate", "reorder", "drop", "outcome_unknown", "delay"})
#: Faults that are a moment, not an interval (duration ignored).
INSTANT_KINDS = frozenset({"crash", "reboot"})
#: Faults that are an operator's action at one moment (no duration, nothing to undo).
ACTION_KINDS = frozenset({"budget_change"})
#: Planted bugs a ``bug`` fault may switch on (see :mod:`syncengine.sim.faults`).
BUG_NAMES = frozenset(
    {
        "retry_decline_new_key",
        "ack_before_store",
        "ignore_total_limit",
        "void_new_refund_id",
        "void_day_in_utc",
        "double_budget",
        "no_restore_hold",
        "ignore_back_push",
        "ignore_lower_budget",
    }
)
#: Processor calls a ``server_crash`` may be armed to die in (``call = ...``).
CRASH_CALLS = frozenset({"charge", "refund"})

ENTRY_POLICIES = frozenset({"auto", "prompt", "forced"})
CARD_KINDS = frozenset(
    {"visa", "mastercard", "discover", "amex", "interac", "eftpos", "eftpos_visa", "gift"}
)
ENTRY_KINDS = frozenset({"tap", "insert", "swipe", "manual"})
NAME_BYTES_MAX = 200  # the name is part of file names (reports, --keep folders)

#: Counters an ``[expect]`` key may name (``key``, ``key_min`` or ``key_max``); see
#: :mod:`syncengine.sim.checker`, which counts them.
EXPECT_COUNTERS = frozenset(
    {
        "captured",
        "approved",
        "declined",
        "expired",
        "pending",
        "refused",
        "lost",
        "unreported",
        "duplicate_charges",
        "limit_breaches",
        "budget_breaches",
        "budget_peak_minor",
        "attempts",
        "approved_online",
        "approved_offline",
        "declined_online",
        "ack_markers_lost",
        "voids_requested",
        "voided",
        "void_refused",
        "void_declined_locally",
        "faults_skipped",
    }
)
#: Counters by reason or code: ``refused:<reason>``, ``notice:<code>``...
EXPECT_PREFIXES = {
    "refused:": "<reason>",
    "notice:": "<code>",
    "void_refused:": "<reason>",
    "void_declined_locally:": "<reason>",
}


class ScenarioError(ConfigError):
    """A scenario file is malformed; the message names the key and what to write."""


def parse_duration_ms(text: object, *, allow_negative: bool = False) -> int:
    """Parse ``"1h30m"``-style text into milliseconds.

    Units, largest first, each at most once: ``d``, ``h``, ``m``, ``s``, ``ms``. A bare
    ``"0"`` is zero. Raises :class:`ScenarioError` with an example of the expected form.
    """
    if not isinstance(text, str):
        raise ScenarioError(f'a duration is a string such as "90s" or "1h30m", got {text!r}')
    raw = text.strip()
    sign = 1
    if raw.startswith("-"):
        if not allow_negative:
            raise ScenarioError(f"duration {text!r} cannot be negative here")
        sign, raw = -1, raw[1:]
    if raw == "0":
        return 0
    pos, total_ms, last_unit = 0, 0, -1
    for match in _PART_RE.finditer(raw):
        if match.start() != pos:
            break
        unit_index = _UNIT_ORDER.index(match.group(2))
        if unit_index <= last_unit:
            raise ScenarioError(f"duration {text!r}: write units largest first, once each")
        last_unit = unit_index
        total_ms += int(match.group(1)) * _UNIT_MS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or last_unit < 0:
        raise ScenarioError(
            f'duration {text!r} is not understood; write it like "90s", "30m" or "1h30m"'
        )
    if total_ms > DURATION_MS_MAX:
        raise ScenarioError(f"duration {text!r} is longer than 30 days")
    return sign * total_ms


def format_duration_ms(value_ms: int) -> str:
    """Inverse of :func:`parse_duration_ms` for display (``5400000`` -> ``"1h30m"``)."""
    if value_ms == 0:
        return "0s"
    sign = "-" if value_ms < 0 else ""
    rest, parts = abs(value_ms), []
    for unit in _UNIT_ORDER:
        count, rest = divmod(rest, _UNIT_MS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


@dataclass(frozen=True, slots=True)
class MerchantSpec:
    """``[merchant]``: region, currency, offline settings and limits (minor units)."""

    id: str = "M1"
    region: str = "US"
    currency: str = "USD"
    offline_allowed: bool = True
    offline_entry: str = "auto"
    auto_after_ms: int = AUTO_AFTER_MS_DEFAULT
    auto_on_provider_outage: bool = True
    per_transaction_limit_minor: int = 500_000
    total_limit_minor: int = 5_000_000
    operator_delay_ms: int = OPERATOR_DELAY_MS_DEFAULT
    rules: tuple[str, ...] = ()
    timezone: str = "UTC"  # the merchant's business day (voids, batches), an IANA name
    offline_budget_minor: int | None = None  # the merchant-wide offline budget (escrow)


@dataclass(frozen=True, slots=True)
class TerminalSpec:
    """One terminal: its id and device class."""

    id: str
    device_class: str = "terminal"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """``[workload]``: payment arrivals per terminal and what they look like."""

    payments_per_hour: float = 30.0
    amount_min_minor: int = 100
    amount_max_minor: int = 30_000
    cards: Mapping[str, float] = field(default_factory=lambda: {"visa": 0.6, "mastercard": 0.4})
    entry: Mapping[str, float] = field(default_factory=lambda: {"tap": 0.7, "insert": 0.3})
    decline_rate: float = 0.0
    emails: float = 0.0
    start_ms: int = 0
    stop_ms: int | None = None
    standalone: float = 0.0  # share of payments the POS takes as standalone (online only)
    void_fraction: float = 0.0  # share of approved standalone payments the operator voids
    void_after_ms: int = VOID_AFTER_MS_DEFAULT


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One ``[[faults]]`` entry. ``targets`` None means every terminal / link."""

    kind: str
    at_ms: int
    duration_ms: int = 0
    targets: tuple[str, ...] | None = None
    probability: float = 1.0
    offset_ms: int = 0
    latency_ms: int = 0
    bug: str = ""
    call: str = ""  # server_crash: die in the next call of this kind ("" = any)
    budget_minor: int = 0  # budget_change: the merchant's new offline budget

    @property
    def end_ms(self) -> int:
        return self.at_ms + self.duration_ms

    def hits(self, terminal_id: str) -> bool:
        return self.targets is None or terminal_id in self.targets


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole scenario, validated. ``expect`` maps a counter (``lost``, ``approved_min``,
    ``expired_max``...) to the value it must equal, or be at least/most."""

    name: str
    seed: int
    duration_ms: int
    merchant: MerchantSpec
    terminals: tuple[TerminalSpec, ...]
    workload: WorkloadSpec
    faults: tuple[FaultSpec, ...]
    expect: Mapping[str, int]
    settle_ms: int = SETTLE_MS_DEFAULT
    description: str = ""
    path: str = ""

    @property
    def end_ms(self) -> int:
        """When a run of this scenario ends (ms after its start): ``settle`` after the last
        thing it does, which is the end of ``duration``, of the last fault (at least a
        minute each), or the last void the workload can ask for (``void_after`` after its
        last payment)."""
        busy = [self.duration_ms]
        busy += [ft.at_ms + max(ft.duration_ms, 60_000) for ft in self.faults]
        wl = self.workload
        if wl.void_fraction > 0:
            last_payment = self.duration_ms if wl.stop_ms is None else wl.stop_ms
            busy.append(min(last_payment, self.duration_ms) + wl.void_after_ms)
        return max(busy) + self.settle_ms


# --- validation helpers -------------------------------------------------------------------


class _Section:
    """Typed access to one TOML table with errors naming ``where.key``."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ScenarioError(f"{where} must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def str_(self, key: str, default: str, allowed: frozenset[str] | None = None) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ScenarioError(f"{self.where}.{key} must be a non-empty string")
        if allowed is not None and value not in allowed:
            raise ScenarioError(f"{self.where}.{key} = {value!r}; use one of {sorted(allowed)}")
        return value

    def bool_(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ScenarioError(f"{self.where}.{key} must be true or false")
        return value

    def int_(self, key: str, default: int, lo: int = 0, hi: int = 2**62) -> int:
        value = self._get(key)
        if value is None:
            return default
        if type(value) is not int or not lo <= value <= hi:
            raise ScenarioError(f"{self.where}.{key} must be an integer in {lo}..{hi}")
        return value

    def number(self, key: str, default: float, lo: float = 0.0, hi: float = 1.0) -> float:
        value = self._get(key)
        if value is None:
            return default
        if type(value) not in (int, float) or not lo <= value <= hi:
            raise ScenarioError(f"{self.where}.{key} must be a number in {lo}..{hi}")
        return float(value)

    def duration(self, key: str, default: int, allow_negative: bool = False) -> int:
        value = self._get(key)
        if value is None:
            return default
        try:
            return parse_duration_ms(value, allow_negative=allow_negative)
        except ScenarioError as exc:
            raise ScenarioError(f"{self.where}.{key}: {exc}") from None

    def money_minor(self, key: str, default: int, currency: str) -> int:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ScenarioError(
                f'{self.where}.{key} must be a decimal string such as "300.00" (no floats)'
            )
        try:
            return Money.parse(value, currency).minor
        except MoneyError as exc:
            raise ScenarioError(f"{self.where}.{key}: {exc}") from None

    def mix(
        self, key: str, default: Mapping[str, float], allowed: frozenset[str]
    ) -> dict[str, float]:
        value = self._get(key)
        if value is None:
            return dict(default)
        if not isinstance(value, dict) or not value:
            raise ScenarioError(f"{self.where}.{key} must be a table like {{ visa = 0.6, ... }}")
        out: dict[str, float] = {}
        for name, weight in value.items():
            if name not in allowed:
                raise ScenarioError(f"{self.where}.{key}.{name}: use one of {sorted(allowed)}")
            if type(weight) not in (int, float) or weight < 0:
                raise ScenarioError(f"{self.where}.{key}.{name} must be a weight >= 0")
            out[name] = float(weight)
        if sum(out.values()) <= 0:
            raise ScenarioError(f"{self.where}.{key} weights must not all be zero")
        return out

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ScenarioError(
                f"{self.where}: unknown key(s) {', '.join(unknown)}; see docs/scenarios.md"
            )


def _merchant(data: object) -> MerchantSpec:
    s = _Section(data if data is not None else {}, "[merchant]")
    region = s.str_("region", "US", frozenset(r.value for r in Region))
    currency = s.str_("currency", "USD")
    try:
        per_tx_max, total_max = limit_maxima(currency)
    except ConfigError as exc:
        raise ScenarioError(f"[merchant].currency: {exc}") from None
    rules = s._get("rules")
    if rules is not None and (
        not isinstance(rules, list) or not all(isinstance(r, str) for r in rules)
    ):
        raise ScenarioError("[merchant].rules must be a list of rule names")
    spec = MerchantSpec(
        id=s.str_("id", "M1"),
        region=region,
        currency=currency,
        offline_allowed=s.bool_("offline_allowed", True),
        offline_entry=s.str_("offline_entry", "auto", ENTRY_POLICIES),
        auto_after_ms=s.duration("auto_after", AUTO_AFTER_MS_DEFAULT),
        auto_on_provider_outage=s.bool_("auto_on_provider_outage", True),
        per_transaction_limit_minor=s.money_minor(
            "per_transaction_limit", per_tx_max.minor, currency
        ),
        total_limit_minor=s.money_minor("total_limit", total_max.minor, currency),
        operator_delay_ms=s.duration("operator_delay", OPERATOR_DELAY_MS_DEFAULT),
        rules=tuple(rules or ()),
        timezone=_timezone(s.str_("timezone", "UTC")),
        offline_budget_minor=(
            s.money_minor("offline_budget", 0, currency)
            if s._get("offline_budget") is not None
            else None
        ),
    )
    s.done()
    if not 0 < spec.per_transaction_limit_minor <= per_tx_max.minor:
        raise ScenarioError(f"[merchant].per_transaction_limit must be in (0, {per_tx_max}]")
    if not 0 < spec.total_limit_minor <= total_max.minor:
        raise ScenarioError(f"[merchant].total_limit must be in (0, {total_max}]")
    if spec.offline_budget_minor is not None and spec.offline_budget_minor < 0:
        raise ScenarioError("[merchant].offline_budget cannot be negative")
    return spec


def _timezone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScenarioError(
            f"[merchant].timezone = {name!r} is not a time zone; write an IANA name such as "
            '"America/New_York" or "UTC"'
        ) from None
    return name


def _terminals(data: object) -> tuple[TerminalSpec, ...]:
    if data is None:
        return (TerminalSpec("T1"),)
    if not isinstance(data, list) or not data:
        raise ScenarioError("[[terminals]] must be a list of tables (one per id or group)")
    out: list[TerminalSpec] = []
    classes = frozenset(d.value for d in DeviceClass)
    for index, entry in enumerate(data):
        s = _Section(entry, f"[[terminals]] #{index + 1}")
        device_class = s.str_("device_class", "terminal", classes)
        if s.has("count"):
            count = s.int_("count", 1, 1, TERMINALS_COUNT_MAX)
            prefix = s.str_("id_prefix", "T")
            start = len([t for t in out if t.id.startswith(prefix)]) + 1
            out.extend(TerminalSpec(f"{prefix}{start + i}", device_class) for i in range(count))
        else:
            tid = s.str_("id", "")
            if not tid or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", tid):
                raise ScenarioError(
                    f'[[terminals]] #{index + 1} needs id = "T1" (letters, digits, -_.) '
                    "or count = N with id_prefix"
                )
            out.append(TerminalSpec(tid, device_class))
        s.done()
    ids = [t.id for t in out]
    if len(set(ids)) != len(ids):
        raise ScenarioError(f"[[terminals]]: terminal ids repeat: {ids}")
    if len(ids) > TERMINALS_COUNT_MAX:
        raise ScenarioError(f"[[terminals]]: at most {TERMINALS_COUNT_MAX} terminals")
    return tuple(out)


def _workload(data: object, merchant: MerchantSpec, duration_ms: int) -> WorkloadSpec:
    s = _Section(data if data is not None else {}, "[workload]")
    cur = merchant.currency
    spec = WorkloadSpec(
        payments_per_hour=s.number("payments_per_hour", 30.0, 0.0, PAYMENTS_PER_HOUR_MAX),
        amount_min_minor=s.money_minor("amount_min", Money.parse("1.00", cur).minor, cur),
        amount_max_minor=s.money_minor("amount_max", Money.parse("300.00", cur).minor, cur),
        cards=s.mix("cards", {"visa": 0.6, "mastercard": 0.4}, CARD_KINDS),
        entry=s.mix("entry", {"tap": 0.7, "insert": 0.3}, ENTRY_KINDS),
        decline_rate=s.number("decline_rate", 0.0),
        emails=s.number("emails", 0.0),
        start_ms=s.duration("start", 0),
        stop_ms=s.duration("stop", duration_ms),
        standalone=s.number("standalone", 0.0),
        void_fraction=s.number("void_fraction", 0.0),
        void_after_ms=s.duration("void_after", VOID_AFTER_MS_DEFAULT),
    )
    s.done()
    if not 0 < spec.amount_min_minor <= spec.amount_max_minor:
        raise ScenarioError("[workload]: need 0 < amount_min <= amount_max")
    if spec.void_fraction > 0 and spec.standalone <= 0:
        raise ScenarioError(
            "[workload].void_fraction needs standalone > 0 (only standalone payments are "
            "voided on the terminal); add e.g. standalone = 0.5"
        )
    if spec.void_fraction > 0 and spec.void_after_ms <= 0:
        raise ScenarioError('[workload].void_after must be positive, e.g. "2m"')
    stop_ms = duration_ms if spec.stop_ms is None else spec.stop_ms
    if stop_ms > duration_ms:
        raise ScenarioError(
            f"[workload].stop ({format_duration_ms(stop_ms)}) is after the end of duration "
            f"({format_duration_ms(duration_ms)}): payments would go on into the settle "
            "window; write stop <= duration"
        )
    if spec.start_ms > stop_ms:
        raise ScenarioError(
            f"[workload].start ({format_duration_ms(spec.start_ms)}) is after "
            f"{'stop' if s.has('stop') else 'the end of duration'} "
            f"({format_duration_ms(stop_ms)}): no payment would arrive; "
            "write start <= stop"
        )
    return spec


def _faults(
    data: object, terminal_ids: set[str], merchant: MerchantSpec, duration_ms: int
) -> tuple[FaultSpec, ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or len(data) > FAULTS_COUNT_MAX:
        raise ScenarioError(f"[[faults]] must be a list of at most {FAULTS_COUNT_MAX} tables")
    out: list[FaultSpec] = []
    for index, entry in enumerate(data):
        s = _Section(entry, f"[[faults]] #{index + 1}")
        kind = s.str_("kind", "", FAULT_KINDS)
        if not kind:
            raise ScenarioError(
                f"[[faults]] #{index + 1} needs kind; use one of {sorted(FAULT_KINDS)}"
            )
        targets_raw = s._get("targets")
        targets: tuple[str, ...] | None = None
        if targets_raw is not None:
            if not isinstance(targets_raw, list) or not all(
                isinstance(t, str) for t in targets_raw
            ):
                raise ScenarioError(f"[[faults]] #{index + 1}.targets must be a list of ids")
            unknown = sorted(set(targets_raw) - terminal_ids)
            if unknown:
                raise ScenarioError(
                    f"[[faults]] #{index + 1}.targets names unknown terminal(s) {unknown}; "
                    f"known: {sorted(terminal_ids)}"
                )
            targets = tuple(targets_raw)
        fault = FaultSpec(
            kind=kind,
            at_ms=s.duration("at", 0),
            duration_ms=s.duration("duration", 0),
            targets=targets,
            probability=s.number("probability", 1.0 if kind not in PROBABILISTIC_KINDS else 0.2),
            offset_ms=s.duration("offset", 0, allow_negative=True),
            latency_ms=s.duration("latency", 0),
            bug=s.str_("bug", "", BUG_NAMES),
            call=s.str_("call", "", CRASH_CALLS),
            budget_minor=s.money_minor("to", -1, merchant.currency),
        )
        s.done()
        if fault.at_ms > duration_ms:
            raise ScenarioError(
                f"[[faults]] #{index + 1} ({kind}): at = {format_duration_ms(fault.at_ms)} "
                f"is after the end of the scenario (duration = "
                f"{format_duration_ms(duration_ms)}); move it earlier or lengthen duration"
            )
        if kind == "budget_change":
            if fault.budget_minor < 0:
                raise ScenarioError(
                    f'[[faults]] #{index + 1}: budget_change needs to = "600.00" '
                    "(the merchant's new offline budget)"
                )
            if merchant.offline_budget_minor is None:
                raise ScenarioError(
                    f"[[faults]] #{index + 1}: budget_change changes [merchant].offline_budget;"
                    " set one to start from"
                )
            if fault.duration_ms or fault.targets is not None:
                raise ScenarioError(
                    f"[[faults]] #{index + 1}: budget_change is a moment for the whole "
                    "merchant (no duration, no targets)"
                )
        elif fault.budget_minor >= 0:
            raise ScenarioError(
                f'[[faults]] #{index + 1} ({kind}): to = "..." is for kind = "budget_change"'
            )
        else:
            fault = replace(fault, budget_minor=0)
        if fault.call and kind != "server_crash":
            raise ScenarioError(
                f'[[faults]] #{index + 1} ({kind}): call = "..." is for kind = "server_crash"'
            )
        if (
            kind not in INSTANT_KINDS | ACTION_KINDS
            and kind != "clock_skew"
            and fault.duration_ms <= 0
        ):
            raise ScenarioError(f'[[faults]] #{index + 1} ({kind}) needs duration = "..."')
        if kind == "bug" and not fault.bug:
            raise ScenarioError(
                f'[[faults]] #{index + 1}: kind = "bug" needs bug = one of {sorted(BUG_NAMES)}'
            )
        if kind == "clock_skew" and fault.offset_ms == 0:
            raise ScenarioError(f'[[faults]] #{index + 1}: clock_skew needs offset = "-7m"')
        out.append(fault)
    return tuple(sorted(out, key=lambda f: (f.at_ms, f.kind)))


def _expect(data: object) -> dict[str, int]:
    if data is None:
        return {"lost": 0, "duplicate_charges": 0, "limit_breaches": 0}
    if not isinstance(data, dict):
        raise ScenarioError("[expect] must be a table")
    out = {"lost": 0, "duplicate_charges": 0, "limit_breaches": 0}
    for key, value in data.items():
        if not _expect_key_known(key):
            raise ScenarioError(
                f"[expect].{key}: unknown counter; use one of {', '.join(sorted(EXPECT_COUNTERS))}"
                f", or {', '.join(p + what for p, what in EXPECT_PREFIXES.items())}; each may end in "
                "_min or _max (see docs/scenarios.md)"
            )
        if type(value) is not int or value < 0:
            raise ScenarioError(f"[expect].{key} must be a non-negative integer")
        out[key] = value
    return out


def _expect_key_known(key: str) -> bool:
    base = key[:-4] if key.endswith(("_min", "_max")) else key
    if base in EXPECT_COUNTERS:
        return True
    return any(base.startswith(p) and len(base) > len(p) for p in EXPECT_PREFIXES)


def _name(name: str) -> str:
    if "/" in name or "\\" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ScenarioError(
            f"name = {name!r}: the name is part of file names (--report, --keep); "
            "write it without '/', '\\' or control characters"
        )
    if len(name.encode()) > NAME_BYTES_MAX:
        raise ScenarioError(f"name is longer than {NAME_BYTES_MAX} bytes; write a shorter one")
    return name


def parse(data: Mapping[str, Any], path: str = "<string>") -> Scenario:
    """Validate a parsed TOML document into a :class:`Scenario`."""
    try:
        top = _Section(dict(data), "top level")
        name = _name(top.str_("name", Path(path).stem or "scenario"))
        seed = top.int_("seed", 1, 0, 2**63 - 1)
        duration_ms = top.duration("duration", 3_600_000)
        if duration_ms <= 0:
            raise ScenarioError("duration must be positive")
        merchant = _merchant(top._get("merchant"))
        terminals = _terminals(top._get("terminals"))
        workload = _workload(top._get("workload"), merchant, duration_ms)
        faults = _faults(top._get("faults"), {t.id for t in terminals}, merchant, duration_ms)
        expect = _expect(top._get("expect"))
        settle_ms = top.duration("settle", SETTLE_MS_DEFAULT)
        description = top.str_("description", "")
        top.done()
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return Scenario(
        name,
        seed,
        duration_ms,
        merchant,
        terminals,
        workload,
        faults,
        expect,
        settle_ms,
        description,
        path,
    )


def _toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None


def loads(text: str, path: str = "<string>") -> Scenario:
    """Parse scenario TOML text (empty text is the default scenario)."""
    return parse(_toml(text, path), path)


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file; an empty one is refused (it would silently run
    the defaults)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(
            f"{p}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); a scenario is a TOML file (see docs/scenarios.md)"
        ) from None
    data = _toml(text, str(p))
    if not data:  # an empty file (or only comments) would run the defaults: surely a mistake
        raise ScenarioError(
            f"{p} is empty (no key at all); write the scenario in it, the format is in "
            "docs/scenarios.md"
        )
    return parse(data, str(p))
