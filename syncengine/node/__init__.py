"""The terminal SDK a POS app embeds (see docs/sdk.md)."""

from syncengine.node.machine import CardRead, PaymentResult, TerminalConfig, TerminalMachine
from syncengine.node.sdk import Terminal, ZReport

__all__ = ["CardRead", "PaymentResult", "Terminal", "TerminalConfig", "TerminalMachine", "ZReport"]
