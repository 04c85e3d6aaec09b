"""Money as integer micro-dollars: sums of floats drift, integers do not."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

Micros = int
MICROS_PER_USD = 1_000_000


def usd_to_micros(usd: Decimal | str | int) -> Micros:
    amount = Decimal(usd) * MICROS_PER_USD
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def micros_to_usd(micros: Micros) -> float:
    """For JSON and Prometheus only; exact to the micro-dollar as a decimal string.

    IEEE division is correctly rounded: for any integer a float holds exactly,
    this is the double nearest the exact quotient, the same value
    float(Decimal(micros) / 10**6) gives, at a twentieth of the cost.
    """
    return micros / MICROS_PER_USD


def format_usd(micros: Micros) -> str:
    return f"${Decimal(micros) / MICROS_PER_USD:.2f}"
