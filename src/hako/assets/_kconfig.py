"""Kconfig fragments: parse them and check that every symbol took its value in the final .config.

`make allnoconfig KCONFIG_ALLCONFIG=<fragment>` silently drops a symbol whose dependencies are not
met (or that does not exist in this kernel version), so the build checks every line afterwards.
"""

from __future__ import annotations

import re

from hako.errors import AssetError

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse(text: str) -> dict[str, str]:
    """{symbol: value} of a .config or fragment; ``# CONFIG_X is not set`` reads as ``n``."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def mismatches(fragment: str, config: str) -> list[tuple[str, str, str]]:
    """(symbol, wanted, got) for each fragment symbol whose value did not stick.

    A symbol absent from .config counts as ``n`` (Kconfig does not write symbols whose
    dependencies are unmet), so ``CONFIG_X=n`` is satisfied by absence; ``got`` is "absent" then.
    """
    want = parse(fragment)
    have = parse(config)
    bad = []
    for sym, value in want.items():
        got = have.get(sym)
        if got == value or (got is None and value == "n"):
            continue
        bad.append((sym, value, "absent" if got is None else got))
    return bad


def check_fragment(fragment: str, config: str) -> None:
    """AssetError naming every fragment symbol that did not take its value."""
    bad = mismatches(fragment, config)
    if bad:
        shown = ", ".join(f"{sym}={want} (got {got})" for sym, want, got in bad)
        raise AssetError(
            f"kernel config: {len(bad)} symbol(s) of the fragment did not stick: {shown}; "
            "fix guest/kernel/hako.config (a dependency is missing or the symbol does not exist)"
        )
