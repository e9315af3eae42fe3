"""argparse types every warmpod command shares: sizes, positive numbers, quantiles. A bad value is a usage error
(exit 2) whose message says what was expected."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'16MiB' → 16777216, '1.5G' → 1610612736 (binary units for K/M/G/T, 'B' optional), '4096' → 4096."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 16MiB, 1GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    return int(number * (1 << (10 * " KMGT".index(unit or " "))))


def size_arg(text: str) -> int:
    """`parse_size` as an argparse type: a bad size is a usage error that says why."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(kind: type[int] | type[float], minimum: float = 1) -> Callable[[str], int | float]:
    """An argparse `type=`: a number of `kind` at least `minimum` (NaN refused)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    return parse


def quantile(text: str) -> float:
    """An argparse `type=`: a quantile, in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse `type=`: a TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"must be in 0-65535 (0: any free port), got {port}")
    return port
