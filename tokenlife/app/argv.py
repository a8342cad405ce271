"""The command word of a ``tokenlife`` command line, found without argparse."""


def subcommand(argv: list[str]) -> str | None:
    """The first word that is neither an option nor the value of -c/--config."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None
