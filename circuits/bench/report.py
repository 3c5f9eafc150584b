"""Printing benchmark figures: a rich table, and a chart with matplotlib."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from circuits.bench.ring import Figure, ratios


def _rate(bps: float) -> str:
    return f"{bps / 1e9:.2f} GB/s" if bps >= 1e8 else f"{bps / 1e6:.1f} MB/s"


def print_ring(figures: list[Figure], console: Console) -> None:
    """Throughput and latency tables, then the ratios the targets use."""
    sizes = sorted({f.write_size for f in figures if f.test == "stream"})
    transports = list(dict.fromkeys(f.transport for f in figures))
    by = {(f.transport, f.test, f.write_size): f for f in figures}
    table = Table(title="stream throughput (median of rounds)")
    table.add_column("transport")
    for size in sizes:
        table.add_column(f"{size} B writes", justify="right")
    for t in transports:
        table.add_row(t, *[_rate(by[(t, "stream", s)].median) if (t, "stream", s) in by else "-"
                           for s in sizes])
    console.print(table)
    rtt = Table(title="64 B round trip")
    rtt.add_column("transport")
    rtt.add_column("p50", justify="right")
    rtt.add_column("p99", justify="right")
    for f in figures:
        if f.test == "rtt":
            rtt.add_row(f.transport, f"{f.median * 1e6:.1f} us", f"{f.p99 * 1e6:.1f} us")
    console.print(rtt)
    for name, value in ratios(figures).items():
        console.print(f"{name}: [bold]{value:.2f}[/bold]")


def plot_ring(figures: list[Figure], path: str) -> None:
    """Throughput against write size, one line per transport, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in dict.fromkeys(f.transport for f in figures):
        pts = sorted((f.write_size, f.median / 1e9) for f in figures
                     if f.transport == t and f.test == "stream")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("write size (bytes)")
    ax.set_ylabel("throughput (GB/s)")
    ax.set_title("circuits: stream throughput, median of rounds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
