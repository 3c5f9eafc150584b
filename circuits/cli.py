"""The `circuits` command line."""
from __future__ import annotations

import json

import click
from rich.console import Console


@click.group()
def main() -> None:
    """circuits: circuit-switched, zero-copy sockets for co-located guests."""


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


if __name__ == "__main__":
    main()
