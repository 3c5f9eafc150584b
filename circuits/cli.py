"""The `circuits` command line."""
from __future__ import annotations

import json

import click
from rich.console import Console


@click.group()
def main() -> None:
    """circuits: circuit-switched, zero-copy sockets for co-located guests."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file (docs/policy.md).")
@click.option("-v", "--verbose", is_flag=True, help="Log every setup decision.")
def operator(config_path: str, verbose: bool) -> None:
    """Run the switch operator in the foreground (logs to stderr; SIGTERM stops it)."""
    import logging

    from circuits.operator.config import ConfigError, load
    from circuits.operator.daemon import run

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    run(config)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--guest", required=True, help="The guest to run as.")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file, to find the guest's control socket.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(guest: str, config_path: str, command: tuple[str, ...]) -> None:
    """Run COMMAND as a guest: its control socket in CIRCUITS_CONTROL."""
    import os

    from circuits.client import Control
    from circuits.operator.config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if guest not in config.guests:
        raise click.ClickException(f"no guest {guest!r} in {config_path}")
    path = config.guests[guest].control
    try:
        Control(path).close()  # is the operator there? never fall back to the kernel's network
    except OSError as e:
        raise click.ClickException(f"the operator does not answer for guest {guest!r}: {e}")
    env = {**os.environ, "CIRCUITS_CONTROL": path, "CIRCUITS_GUEST": guest}
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as e:
        raise click.ClickException(f"cannot run {command[0]}: {e.strerror}") from None


@main.group()
def bench() -> None:
    """Benchmarks, measured side by side with peer transports in one run."""


@bench.command("ring")
@click.option("--rounds", default=5, show_default=True, help="Rounds; figures are medians.")
@click.option("--quick", is_flag=True, help="Smaller transfers (for demos and smoke tests).")
@click.option("--size", "sizes", multiple=True, type=int,
              help="Write size in bytes (repeatable; default 64, 1024, 65536).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG chart here.")
def bench_ring(rounds: int, quick: bool, sizes: tuple[int, ...], as_json: bool,
               plot: str | None) -> None:
    """Circuit vs Unix socketpair vs TCP loopback: throughput and 64 B round trip."""
    from circuits.bench import ring as ring_bench
    from circuits.bench.report import plot_ring, print_ring

    console = Console(stderr=as_json)
    with console.status("measuring") as status:
        figures = ring_bench.run(rounds=rounds, quick=quick,
                                 sizes=sizes or ring_bench.WRITE_SIZES,
                                 progress=lambda msg: status.update(msg))
    if as_json:
        click.echo(json.dumps(ring_bench.as_json(figures), indent=2))
    else:
        print_ring(figures, console)
    if plot:
        plot_ring(figures, plot)
        console.print(f"chart written to {plot}")


@bench.command("setup")
@click.option("--rounds", default=5, show_default=True, help="Rounds; figures are medians.")
@click.option("--count", default=2000, show_default=True, help="Setups per round.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_setup(rounds: int, count: int, as_json: bool) -> None:
    """Connection setups per second: through the operator vs TCP on loopback."""
    from rich.table import Table

    from circuits.bench import setup as setup_bench

    figures = setup_bench.run(rounds=rounds, count=count)
    out = setup_bench.as_json(figures)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    table = Table(title="setup, 1-byte exchange, close (median of rounds)")
    for col in ("transport", "setups/s", "p50", "p99"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for f in figures:
        table.add_row(f.transport, f"{f.per_second:,.0f}", f"{f.p50_us:.0f} us", f"{f.p99_us:.0f} us")
    console = Console()
    console.print(table)
    for name, value in out["ratios"].items():
        console.print(f"{name}: [bold]{value:.2f}[/bold]")


if __name__ == "__main__":
    main()
