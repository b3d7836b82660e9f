"""Placeholder registration, replaced by the distillation CLI."""


def add_parser(subparsers) -> None:
    return None
