"""Which cards a terminal may take offline (R6): region rules and rule sets, as data.

Seed 000 (Lightspeed X-Series) lists the offline payment methods (Visa, Mastercard,
Discover, American Express), the entry methods (tap, insert; "Manual card entry is not
allowed") and the regions: UK/Europe, United States, Canada ("Interac is not supported") and
Australia ("only co-branded EFTPOS cards with the Visa or Mastercard logos are supported").
Seed 004 (Square) adds: offline, no contactless, no Square or Clearpay gift cards, no keyed
card numbers.

Reading of the Australian rule: the sentence qualifies *which eftpos cards* work; it does
not take Visa or Mastercard credit cards away from Australian merchants (the payment
methods list applies to every region). So in AU a plain Visa, Mastercard, Discover or Amex
card is accepted, an eftpos card is accepted only if it also carries the Visa or Mastercard
logo (and goes through that network), and an eftpos-only card is refused.

Card model: ``brand`` is the network the terminal would route the payment through (the
application the chip or contactless kernel selected); ``co_brands`` are the other networks
on the card. Only the Australian eftpos rule looks at ``co_brands``: an Interac card in
Canada is refused even if it also carries a Visa logo, because the payment would go
through Interac; the cashier can ask for the card to be used as Visa.

Rule sets are frozen sets of :class:`Rule` names. ``no_manual_entry`` is always in force
offline (seeds 000, 004 and R1), whatever the set says; see :data:`MANDATORY_RULES`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from syncengine.core.errors import ConfigError, Refused


class Brand(StrEnum):
    """Card networks (and gift cards) a terminal may be presented with."""

    VISA = "visa"
    MASTERCARD = "mastercard"
    DISCOVER = "discover"
    AMEX = "amex"
    INTERAC = "interac"
    EFTPOS = "eftpos"
    GIFT = "gift"


BRAND_NAMES: Mapping[Brand, str] = MappingProxyType(
    {
        Brand.VISA: "Visa",
        Brand.MASTERCARD: "Mastercard",
        Brand.DISCOVER: "Discover",
        Brand.AMEX: "American Express",
        Brand.INTERAC: "Interac",
        Brand.EFTPOS: "eftpos",
        Brand.GIFT: "gift card",
    }
)


class EntryMethod(StrEnum):
    """How the card was read."""

    TAP = "tap"  # contactless
    INSERT = "insert"  # chip
    SWIPE = "swipe"  # magnetic stripe
    MANUAL = "manual"  # keyed card number


class Region(StrEnum):
    """Merchant regions with their own offline card rules (seed 000)."""

    US = "US"
    CA = "CA"
    GB = "GB"
    EU = "EU"
    AU = "AU"


class Rule(StrEnum):
    """Configurable offline acceptance rules (device class or provider policy)."""

    NO_MANUAL_ENTRY = "no_manual_entry"  # seeds 000, 004; mandatory
    NO_SWIPE = "no_swipe"  # seed 000 lists only tap and insert
    NO_CONTACTLESS_OFFLINE = "no_contactless_offline"  # seed 004
    NO_GIFT_CARDS = "no_gift_cards"  # seed 004; seed 000 lists no gift cards either


#: Rules in force offline whatever a rule set says (R1: never manual/keyed entry).
MANDATORY_RULES: frozenset[Rule] = frozenset({Rule.NO_MANUAL_ENTRY})

#: Seed 000 (Lightspeed X-Series): tap or insert, the four card brands only. Our default.
LIGHTSPEED_RULES: frozenset[Rule] = frozenset(
    {Rule.NO_MANUAL_ENTRY, Rule.NO_SWIPE, Rule.NO_GIFT_CARDS}
)
#: Seed 004 (Square): no contactless, no gift cards, no keyed numbers.
SQUARE_RULES: frozenset[Rule] = frozenset(
    {Rule.NO_MANUAL_ENTRY, Rule.NO_CONTACTLESS_OFFLINE, Rule.NO_GIFT_CARDS}
)
DEFAULT_RULES: frozenset[Rule] = LIGHTSPEED_RULES

_CARD_BRANDS = frozenset({Brand.VISA, Brand.MASTERCARD, Brand.DISCOVER, Brand.AMEX})
_OFFLINE_LINK = "or wait until the terminal is back online"


@dataclass(frozen=True, slots=True)
class BrandRefusal:
    """A region-specific refusal of one brand: stable reason code and cashier message."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class RegionRules:
    """Offline card rules of one region.

    ``accepted_brands`` go through as they are. A brand in ``cobrand_routes`` is accepted
    only if the card also carries one of the listed brands (it is then processed on that
    network). ``refusals`` give region-specific reasons; any other brand gets
    ``brand_not_accepted``.
    """

    name: str
    accepted_brands: frozenset[Brand]
    cobrand_routes: Mapping[Brand, tuple[Brand, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    refusals: Mapping[Brand, BrandRefusal] = field(default_factory=lambda: MappingProxyType({}))


REGIONS: Mapping[Region, RegionRules] = MappingProxyType(
    {
        Region.US: RegionRules("the United States", _CARD_BRANDS),
        Region.GB: RegionRules("the UK", _CARD_BRANDS),
        Region.EU: RegionRules("Europe", _CARD_BRANDS),
        Region.CA: RegionRules(
            "Canada",
            _CARD_BRANDS,
            refusals=MappingProxyType(
                {
                    Brand.INTERAC: BrandRefusal(
                        "interac_not_supported_offline",
                        "Interac cards can't be taken offline in Canada; ask for Visa, "
                        "Mastercard, Discover or American Express, " + _OFFLINE_LINK + ".",
                    )
                }
            ),
        ),
        Region.AU: RegionRules(
            "Australia",
            _CARD_BRANDS,
            cobrand_routes=MappingProxyType({Brand.EFTPOS: (Brand.VISA, Brand.MASTERCARD)}),
            refusals=MappingProxyType(
                {
                    Brand.EFTPOS: BrandRefusal(
                        "eftpos_requires_visa_or_mastercard",
                        "This eftpos card has no Visa or Mastercard logo and can't be taken "
                        "offline; ask for a card with a Visa or Mastercard logo, "
                        + _OFFLINE_LINK
                        + ".",
                    )
                }
            ),
        ),
    }
)


@dataclass(frozen=True, slots=True)
class Card:
    """What the terminal knows about a presented card (never the card number).

    ``brand`` is the network the payment would go through; ``co_brands`` the other
    networks on the card; ``is_gift`` marks gift or stored-value cards of any brand.
    """

    brand: Brand
    entry_method: EntryMethod
    co_brands: frozenset[Brand] = frozenset()
    is_gift: bool = False

    def __post_init__(self) -> None:
        if self.brand in self.co_brands:
            raise ConfigError(f"{self.brand} is the card's brand; it cannot also be a co-brand")

    @property
    def is_gift_card(self) -> bool:
        """True for a gift card, whether flagged or of the ``gift`` brand."""
        return self.is_gift or self.brand is Brand.GIFT


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A region plus the rule names in force offline on a terminal."""

    region: Region
    rules: frozenset[Rule] = DEFAULT_RULES

    @classmethod
    def from_names(cls, region: str, names: Iterable[str]) -> RuleSet:
        """Build a rule set from configuration strings; :class:`ConfigError` if unknown."""
        try:
            return cls(Region(region), frozenset(Rule(name) for name in names))
        except ValueError as exc:
            raise ConfigError(
                f"{exc}; regions: {', '.join(Region)}; rules: {', '.join(Rule)}"
            ) from None

    @property
    def effective_rules(self) -> frozenset[Rule]:
        """The rules actually enforced: ``rules`` plus :data:`MANDATORY_RULES`."""
        return self.rules | MANDATORY_RULES

    def check(self, card: Card) -> Brand:
        """Same as :func:`check_card_offline` with this set's region and rules."""
        return check_card_offline(card, self.region, self.rules)


def check_card_offline(card: Card, region: Region, rules: frozenset[Rule] = DEFAULT_RULES) -> Brand:
    """Refuse a card that may not be taken offline; otherwise return the network to use.

    Checks, in order: gift cards, the region's brand rules, then the entry method (so a
    cashier is never told to insert a card whose brand will be refused anyway). Raises
    :class:`Refused` with one of ``gift_card_not_allowed_offline``, ``brand_not_accepted``,
    ``interac_not_supported_offline``, ``eftpos_requires_visa_or_mastercard``,
    ``manual_entry_not_allowed``, ``swipe_not_allowed_offline``,
    ``contactless_not_allowed_offline``.
    """
    active = rules | MANDATORY_RULES
    if card.is_gift_card and Rule.NO_GIFT_CARDS in active:
        raise Refused(
            "gift_card_not_allowed_offline",
            "Gift cards can't be used while the terminal is offline; ask for another card, "
            + _OFFLINE_LINK
            + ".",
        )
    network = card.brand if card.brand is Brand.GIFT else _route(card, REGIONS[Region(region)])
    _check_entry(card.entry_method, active)
    return network


def _route(card: Card, region: RegionRules) -> Brand:
    if card.brand in region.accepted_brands:
        return card.brand
    routes = region.cobrand_routes.get(card.brand)
    if routes is not None:
        for candidate in routes:
            if candidate in card.co_brands:
                return candidate
    refusal = region.refusals.get(card.brand)
    if refusal is not None:
        raise Refused(refusal.reason, refusal.message)
    accepted = _names(region.accepted_brands)
    raise Refused(
        "brand_not_accepted",
        f"{BRAND_NAMES[card.brand]} cards can't be taken offline in {region.name}; "
        f"ask for {accepted}, {_OFFLINE_LINK}.",
    )


def _check_entry(method: EntryMethod, active: frozenset[Rule]) -> None:
    if method is EntryMethod.MANUAL and Rule.NO_MANUAL_ENTRY in active:
        raise Refused(
            "manual_entry_not_allowed",
            "Card numbers can't be keyed in while offline; ask the customer to insert or tap "
            "the card, " + _OFFLINE_LINK + ".",
        )
    if method is EntryMethod.SWIPE and Rule.NO_SWIPE in active:
        raise Refused(
            "swipe_not_allowed_offline",
            "Swiped cards can't be taken offline; ask the customer to insert the card "
            "(chip), " + _OFFLINE_LINK + ".",
        )
    if method is EntryMethod.TAP and Rule.NO_CONTACTLESS_OFFLINE in active:
        raise Refused(
            "contactless_not_allowed_offline",
            "Contactless payments can't be taken offline on this terminal; ask the customer "
            "to insert the card (chip), " + _OFFLINE_LINK + ".",
        )


def _names(brands: frozenset[Brand]) -> str:
    ordered = [BRAND_NAMES[b] for b in Brand if b in brands]
    return ", ".join(ordered[:-1]) + " or " + ordered[-1] if len(ordered) > 1 else ordered[0]
