"""Tests for syncengine.core.policy.acceptance (R6)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncengine.core.errors import ConfigError, Refused
from syncengine.core.policy.acceptance import (
    DEFAULT_RULES,
    LIGHTSPEED_RULES,
    SQUARE_RULES,
    Brand,
    Card,
    EntryMethod,
    Region,
    Rule,
    RuleSet,
    check_card_offline,
)

V, MC, DISC, AMEX = Brand.VISA, Brand.MASTERCARD, Brand.DISCOVER, Brand.AMEX
TAP, INSERT, SWIPE, MANUAL = (
    EntryMethod.TAP,
    EntryMethod.INSERT,
    EntryMethod.SWIPE,
    EntryMethod.MANUAL,
)


def card(
    brand: Brand,
    entry: EntryMethod = INSERT,
    co: frozenset[Brand] = frozenset(),
    gift: bool = False,
) -> Card:
    return Card(brand, entry, co, gift)


ACCEPTED = [
    # Seed 000 "Payment Methods" in every seed 000 region, by tap or insert.
    *(
        pytest.param(card(brand, entry), region, brand, id=f"seed 000: {brand} {entry} in {region}")
        for brand in (V, MC, DISC, AMEX)
        for region in Region
        for entry in (TAP, INSERT)
    ),
    pytest.param(
        card(Brand.EFTPOS, INSERT, frozenset({V})),
        Region.AU,
        V,
        id="seed 000: Australia — eftpos co-branded with Visa goes through Visa",
    ),
    pytest.param(
        card(Brand.EFTPOS, TAP, frozenset({MC})),
        Region.AU,
        MC,
        id="seed 000: Australia — eftpos co-branded with Mastercard goes through Mastercard",
    ),
    pytest.param(
        card(V, INSERT, frozenset({Brand.EFTPOS})),
        Region.AU,
        V,
        id="seed 000: Australia — Visa card carrying eftpos, Visa selected",
    ),
    pytest.param(
        card(V, INSERT),
        Region.AU,
        V,
        id="seed 000 (our reading): Australia — plain Visa credit card is accepted",
    ),
    pytest.param(
        card(V, INSERT, frozenset({Brand.INTERAC})),
        Region.CA,
        V,
        id="seed 000: Canada — Visa debit routed as Visa is accepted",
    ),
]


@pytest.mark.parametrize(("the_card", "region", "network"), ACCEPTED)
def test_accepted_offline(the_card: Card, region: Region, network: Brand) -> None:
    assert check_card_offline(the_card, region, DEFAULT_RULES) == network


REFUSED = [
    pytest.param(
        card(Brand.INTERAC),
        Region.CA,
        DEFAULT_RULES,
        "interac_not_supported_offline",
        id="seed 000: Canada — Interac is not supported",
    ),
    pytest.param(
        card(Brand.INTERAC, TAP, frozenset({V})),
        Region.CA,
        DEFAULT_RULES,
        "interac_not_supported_offline",
        id="seed 000: Canada — Interac selected on a co-branded card is still Interac",
    ),
    pytest.param(
        card(Brand.EFTPOS),
        Region.AU,
        DEFAULT_RULES,
        "eftpos_requires_visa_or_mastercard",
        id="seed 000: Australia — plain eftpos card refused",
    ),
    pytest.param(
        card(Brand.EFTPOS, INSERT, frozenset({AMEX})),
        Region.AU,
        DEFAULT_RULES,
        "eftpos_requires_visa_or_mastercard",
        id="seed 000: Australia — eftpos with an Amex logo is not Visa or Mastercard",
    ),
    pytest.param(
        card(Brand.INTERAC),
        Region.US,
        DEFAULT_RULES,
        "brand_not_accepted",
        id="seed 000: only Visa, Mastercard, Discover, Amex — Interac in the US",
    ),
    pytest.param(
        card(Brand.EFTPOS, INSERT, frozenset({V})),
        Region.GB,
        DEFAULT_RULES,
        "brand_not_accepted",
        id="seed 000: only the four brands — eftpos outside Australia",
    ),
    pytest.param(
        card(V, MANUAL),
        Region.US,
        DEFAULT_RULES,
        "manual_entry_not_allowed",
        id="seed 000: Manual card entry is not allowed",
    ),
    pytest.param(
        card(V, MANUAL),
        Region.EU,
        frozenset[Rule](),
        "manual_entry_not_allowed",
        id="seed 004: no keyed card numbers — even with an empty rule set",
    ),
    pytest.param(
        card(MC, SWIPE),
        Region.US,
        LIGHTSPEED_RULES,
        "swipe_not_allowed_offline",
        id="seed 000: Card Entry Method lists only Tap and Insert",
    ),
    pytest.param(
        card(V, TAP),
        Region.US,
        SQUARE_RULES,
        "contactless_not_allowed_offline",
        id="seed 004: no contactless payments offline",
    ),
    pytest.param(
        card(Brand.GIFT),
        Region.US,
        SQUARE_RULES,
        "gift_card_not_allowed_offline",
        id="seed 004: no Square or Clearpay gift cards offline",
    ),
    pytest.param(
        card(V, INSERT, gift=True),
        Region.GB,
        SQUARE_RULES,
        "gift_card_not_allowed_offline",
        id="seed 004: a Visa-branded gift card is still a gift card",
    ),
    pytest.param(
        card(Brand.GIFT),
        Region.US,
        DEFAULT_RULES,
        "gift_card_not_allowed_offline",
        id="seed 000: gift cards are not among the offline payment methods",
    ),
]


@pytest.mark.parametrize(("the_card", "region", "rules", "reason"), REFUSED)
def test_refused_offline(
    the_card: Card, region: Region, rules: frozenset[Rule], reason: str
) -> None:
    with pytest.raises(Refused) as info:
        check_card_offline(the_card, region, rules)
    assert info.value.reason == reason


def test_interac_message_tells_the_cashier_what_to_do() -> None:
    with pytest.raises(Refused) as info:
        check_card_offline(card(Brand.INTERAC), Region.CA)
    assert str(info.value) == (
        "Interac cards can't be taken offline in Canada; ask for Visa, Mastercard, Discover "
        "or American Express, or wait until the terminal is back online."
    )


def test_brand_refusal_comes_before_entry_method() -> None:
    """A cashier is never told to insert a card whose brand is refused anyway."""
    with pytest.raises(Refused) as info:
        check_card_offline(card(Brand.INTERAC, MANUAL), Region.CA)
    assert info.value.reason == "interac_not_supported_offline"


def test_rules_are_configurable() -> None:
    swiped = card(V, SWIPE)
    assert check_card_offline(swiped, Region.US, SQUARE_RULES) == V  # Square allows swipe
    gift = card(Brand.GIFT, INSERT)
    assert check_card_offline(gift, Region.US, frozenset({Rule.NO_MANUAL_ENTRY})) == Brand.GIFT
    assert check_card_offline(card(V, TAP), Region.US, LIGHTSPEED_RULES) == V


def test_rule_set_from_configuration() -> None:
    rules = RuleSet.from_names("AU", ["no_contactless_offline", "no_gift_cards"])
    assert rules.region is Region.AU
    assert Rule.NO_MANUAL_ENTRY in rules.effective_rules
    with pytest.raises(Refused):
        rules.check(card(V, TAP))
    with pytest.raises(ConfigError):
        RuleSet.from_names("AU", ["no_such_rule"])
    with pytest.raises(ConfigError):
        RuleSet.from_names("XX", [])


def test_card_brand_cannot_be_its_own_co_brand() -> None:
    with pytest.raises(ConfigError):
        Card(V, INSERT, frozenset({V}))


@given(
    st.sampled_from(Brand),
    st.sampled_from(EntryMethod),
    st.frozensets(st.sampled_from(Brand)),
    st.booleans(),
    st.sampled_from(Region),
    st.frozensets(st.sampled_from(Rule)),
)
def test_any_card_is_accepted_through_a_region_brand_or_refused_with_a_reason(
    brand: Brand,
    entry: EntryMethod,
    co: frozenset[Brand],
    gift: bool,
    region: Region,
    rules: frozenset[Rule],
) -> None:
    the_card = Card(brand, entry, co - {brand}, gift)
    try:
        network = check_card_offline(the_card, region, rules)
    except Refused as refused:
        assert refused.reason and str(refused)
        return
    assert entry is not MANUAL
    assert network in {V, MC, DISC, AMEX, Brand.GIFT}
    if region is not Region.AU:
        assert network is brand
    if brand is Brand.INTERAC:
        raise AssertionError("Interac is never accepted offline")
