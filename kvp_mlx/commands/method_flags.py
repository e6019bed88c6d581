"""Command-line flags of the prefill methods, derived from their declarations (kvp_mlx.methods).

Every declared option becomes ``--{method}-{option}`` (or the flag it declares) in an argument
group of its method; its text is converted and checked by the method's declaration, so a wrong
value is a one-line error.
"""

from __future__ import annotations

import argparse
from typing import Any


def _dest(flag: str) -> str:
    return "method_option_" + flag.lstrip("-").replace("-", "_")


def method_summaries() -> str:
    from kvp_mlx.methods import method_specs

    return "; ".join(f"{m.name}: {m.summary}" for m in method_specs())


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with options, one flag per option (default: the method's)."""
    from kvp_mlx.methods import method_specs

    for spec in method_specs():
        options = [o for o in spec.options if o.cli]
        if not options:
            continue
        group = parser.add_argument_group(f"--method {spec.name}", spec.summary)
        for opt in options:
            flag = opt.cli_flag(spec.name)
            extra = f"; one of {', '.join(map(str, opt.choices))}" if opt.choices else ""
            group.add_argument(flag, dest=_dest(flag), default=None, metavar=opt.type.__name__.upper(),
                               help=f"{opt.help} (default: {opt.default}{extra})")


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line for ``method``, converted and checked.

    A flag of another method is refused: it would silently do nothing.
    """
    from kvp_mlx.errors import KVPError
    from kvp_mlx.methods import get_method, method_specs

    given: dict[str, Any] = {}
    for spec in method_specs():
        for opt in spec.options:
            flag = opt.cli_flag(spec.name)
            value = getattr(args, _dest(flag), None) if opt.cli else None
            if value is None:
                continue
            if spec.name != method:
                raise KVPError(f"{flag} applies to --method {spec.name}")
            given[opt.name] = value
    return get_method(method).resolve_options(given, source="cli")


def method_option(args: argparse.Namespace, method: str, name: str) -> Any:
    """One option's value for ``method``: as given on the command line, else its declared default."""
    from kvp_mlx.methods import get_method

    spec = get_method(method)
    opt = spec.option(name)
    value = getattr(args, _dest(opt.cli_flag(method)), None)
    return opt.default if value is None else spec.resolve_options({name: value}, source="cli")[name]
