"""The `qgate` command line: one click group, each command a thin call into the module that owns the job."""

from __future__ import annotations

import json
import sys

import click

from qgate import __version__
from qgate.errors import QgateError


class QgateGroup(click.Group):
    """Turns QgateError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QgateError as exc:
            click.echo(f"qgate: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=QgateGroup)
@click.version_option(__version__, prog_name="qgate")
def cli():
    """Decide whether a quantized LLM checkpoint may ship."""


@cli.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def formats_cmd(as_json):
    """List the numeric formats: element type, block size, scale, bits per value, largest value."""
    from qgate.formats import list_formats

    rows = [f.describe() for f in list_formats()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("name", "element", "block", "scale", "bits/value", "largest")
    table = [header] + [
        (r["name"], r["element"], str(r["block_size"] or "-"), r["scale"], f'{r["bits_per_value"]:g}',
         f'{r["max_value"]:g}' if r["max_value"] is not None else "-")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main():  # console-script entry point
    cli(prog_name="qgate")


if __name__ == "__main__":
    sys.exit(main())
