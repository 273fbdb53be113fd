"""The merchant-wide offline budget (escrow) served by the real server, against SDK terminals.

Three terminals, a budget of 100.00. Partitioned terminals keep taking offline payments
until their share is spent; the sum of outstanding offline payments of all terminals never
exceeds the budget. A terminal that comes back gets its released room re-granted and may
spend it again while the others are still cut off; a larger budget reaches only the
terminals that can hear it, and the sum still holds.
"""

from __future__ import annotations

from pathlib import Path

from e2e_support import (
    ServerProcess,
    Till,
    card,
    close_all,
    go_offline,
    open_terminal,
    usd,
    wait_until,
)

from syncengine.core.money import Money
from syncengine.core.policy.acceptance import EntryMethod
from syncengine.node.machine import PaymentForwarded
from syncengine.processor.testing import running_sandbox

BUDGET_MINOR = 10_000
STEP = usd("7.00")


def _outstanding(tills: list[Till]) -> int:
    return sum(t.terminal.status().pending_amount.minor for t in tills)


def _granted(till: Till) -> int:
    grant = till.terminal.machine.grant_total
    return 0 if grant is None else grant.minor


async def _spend(till: Till, tills: list[Till], budget_minor: int) -> int:
    """Take 7.00 payments offline until the grant refuses; the merchant sum always holds."""
    taken = 0
    for _ in range(100):
        result = await till.terminal.take_payment(STEP, card(), EntryMethod.INSERT)
        if result.outcome == "refused":
            assert result.reason == "over_merchant_budget", result
            break
        assert result.outcome == "approved_offline", result
        taken += 1
        assert _outstanding(tills) <= budget_minor
    else:
        raise AssertionError("the budget never refused a payment")
    return taken


async def test_merchant_budget_holds_across_partitioned_terminals(tmp_path: Path) -> None:
    with running_sandbox(tmp_path / "processor") as sandbox:
        server = ServerProcess(tmp_path / "server", sandbox.url)
        await server.start()
        tills: list[Till] = []
        try:
            await server.allow_offline()
            for tid in ("B1", "B2", "B3"):
                tills.append(await open_terminal(tmp_path, server, tid))
                await server.api("PUT", f"/v1/terminals/{tid}/settings", {"offline_allowed": True})
            cashier = await server.api("POST", "/v1/api-keys", {"role": "cashier"})
            async with server.http(cashier["api_key"]) as http:
                r = await http.put(
                    "/v1/merchant/offline-budget",
                    json={"offline_budget": {"minor": 1, "currency": "USD"}},
                )
                assert r.status_code == 403, r.text
            view = await server.api(
                "PUT",
                "/v1/merchant/offline-budget",
                {"offline_budget": {"minor": BUDGET_MINOR, "currency": "USD"}},
            )
            share = BUDGET_MINOR * 80 // 100 // 3  # a 20 % reserve stays with the server
            assert [t["granted"]["minor"] for t in view["terminals"]] == [share] * 3, view
            await wait_until(
                lambda: all(_granted(t) == share for t in tills), 10, "the grants on terminals"
            )
            b1 = tills[0]
            assert b1.terminal.machine.grant_room() == Money(share, "USD")

            # All three partitioned: each spends its own share, no more.
            for till in tills:
                await go_offline(till)
            assert {t.terminal.status().max_offline_amount.minor for t in tills} == {share}
            for till in tills:
                taken = await _spend(till, tills, BUDGET_MINOR)
                assert taken == share // STEP.minor
            assert _outstanding(tills) <= BUDGET_MINOR

            # B1 comes back: its payments become final, the server hands the room back.
            b1.proxy.heal()
            await wait_until(
                lambda: len(b1.seen(PaymentForwarded)) == share // STEP.minor, 15, "B1 forwarded"
            )
            # The server re-grants as payments become final, maybe in more than one grant:
            # wait for the one that gives B1 its whole share of room back.
            await wait_until(
                lambda: (b1.terminal.machine.grant_room() or usd("0")).minor >= share,
                10,
                "B1's re-grant",
            )
            assert _granted(b1) > share
            assert b1.terminal.status().pending_count == 0
            # B1 goes offline again and spends the re-granted room; B2, B3 still cut off.
            await go_offline(b1)
            assert await _spend(b1, tills, BUDGET_MINOR) == share // STEP.minor

            # A larger budget reaches only the connected terminal (B1); B2, B3 keep theirs.
            b1.proxy.heal()
            await wait_until(lambda: b1.terminal.status().pending_count == 0, 15, "B1 drained")
            view = await server.api(
                "PUT",
                "/v1/merchant/offline-budget",
                {"offline_budget": {"minor": 2 * BUDGET_MINOR, "currency": "USD"}},
            )
            assert view["free"]["minor"] >= 0, view
            held = sum(t["held"]["minor"] for t in view["terminals"])
            assert held <= 2 * BUDGET_MINOR
            await wait_until(
                lambda: (
                    (b1.terminal.machine.grant_room() or usd("0")).minor
                    >= 2 * BUDGET_MINOR * 80 // 100 // 3
                ),
                10,
                "B1's larger share",
            )
            await go_offline(b1)
            await _spend(b1, tills, 2 * BUDGET_MINOR)
            assert _outstanding(tills) <= 2 * BUDGET_MINOR

            # Everyone back: all settles, every terminal holds its share again.
            for till in tills:
                till.proxy.heal()
            await wait_until(
                lambda: all(t.terminal.status().pending_count == 0 for t in tills), 20, "drained"
            )
            view = await server.api("GET", "/v1/merchant/offline-budget")
            assert view["held"]["minor"] <= 2 * BUDGET_MINOR and view["free"]["minor"] >= 0
            merchant = await server.api("GET", "/v1/merchant")
            assert merchant["offline_budget"] == {"minor": 2 * BUDGET_MINOR, "currency": "USD"}
        finally:
            await close_all(tills)
            await server.stop()
