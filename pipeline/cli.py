"""The `vidpipe` command line: each command parses options and calls one library function.

User mistakes raise `VidpipeError`; `main` prints them as one line and exits with code 2.
"""
from __future__ import annotations

import sys

import click

from pipeline.errors import VidpipeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vidpipe")
def cli() -> None:
    """vidpipe: raw video -> two-stream features -> MALT -> online action timeline."""


# Commands are added below, one section per stage; imports stay inside each command so
# that `vidpipe --help` starts fast.

# --- extract ------------------------------------------------------------------------------

# --- labels / import ----------------------------------------------------------------------

# --- model / train / eval -----------------------------------------------------------------

# --- detect / demo ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except VidpipeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
