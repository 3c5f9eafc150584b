"""The `circuits` command line."""
from __future__ import annotations

import json
import sys

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

    from circuits.guestnet import GuestNetError
    from circuits.operator.main import run

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = _load(config_path)
    try:
        run(config)
    except GuestNetError as e:
        raise click.ClickException(f"the operator cannot start: {e}") from None


def _load(config_path: str):
    """The configuration, or a clean error naming its line."""
    from circuits.operator.config import ConfigError, load

    try:
        return load(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _guest(config, name: str):
    if name not in config.guests:
        raise click.ClickException(f"no guest {name!r} in {config.path}")
    return config.guests[name]


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--guest", required=True, help="The guest to run as.")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file, to find the guest's control socket.")
@click.option("--no-preload", is_flag=True,
              help="Do not preload the library (for programs that use the circuits API).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(guest: str, config_path: str, no_preload: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND as a guest: its control socket in CIRCUITS_CONTROL, and the
    preload library in LD_PRELOAD, which makes its TCP sockets circuits.

    A guest with `netns = true` runs inside its network namespace, without
    CAP_NET_RAW, CAP_NET_ADMIN and CAP_SYS_ADMIN (docs/guests.md).  A guest
    with a resolver sees its own /etc/resolv.conf and /etc/hosts, in a
    mount namespace of its own (docs/policy.md, "Resolver")."""
    import os

    from circuits.client import Control
    from circuits.preload import preload_env

    config = _load(config_path)
    path = _guest(config, guest).control
    try:
        Control(path).close()  # is the operator there? never fall back to the kernel's network
    except OSError as e:
        raise click.ClickException(f"the operator does not answer for guest {guest!r}: {e}")
    env = {**os.environ, "CIRCUITS_CONTROL": path, "CIRCUITS_GUEST": guest}
    if not no_preload:
        try:
            env = preload_env(env)
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from None
    relay = _give_guest_files(config, guest) if config.guests[guest].resolvers else None
    if relay is not None:  # programs that ask the nameserver themselves reach the relay
        env["CIRCUITS_BYPASS"] = ",".join(filter(None, [env.get("CIRCUITS_BYPASS"), *relay]))
    if config.guests[guest].netns:
        _confine(config, guest)
    if relay is not None:
        _start_relay(config, guest, relay)
    _default_signals()
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as e:
        raise click.ClickException(f"cannot run {command[0]}: {e.strerror}") from None


def _default_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored
    across exec: the program gets them as a shell would give them (`yes |
    head -1` ends yes by SIGPIPE), as subprocess's restore_signals does."""
    import signal

    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)


def _give_guest_files(config, guest: str) -> list[str]:
    """A private mount namespace with the guest's resolv.conf (naming the
    loopback addresses its DNS relay will take) and hosts; a clean error if
    that cannot be (it needs root), never the host's files."""
    from circuits.dnsrelay import local_addresses
    from circuits.guestnet.etcfiles import give_guest_files
    from circuits.operator.hosts import hosts_file

    g = config.guests[guest]
    addresses = local_addresses(len(g.resolvers))
    try:
        give_guest_files(g, addresses, hosts_file(config))
    except OSError as e:
        raise click.ClickException(f"cannot give guest {guest} its resolver ({e}); it needs"
                                   " root (CAP_SYS_ADMIN), or no resolver for the guest") from None
    return addresses


def _start_relay(config, guest: str, addresses: list[str]) -> None:
    """The DNS relay, in the guest's network (after _confine), for the program."""
    from circuits import dnsrelay

    g = config.guests[guest]
    try:
        socks = dnsrelay.bind_all(addresses)
    except OSError as e:
        raise click.ClickException(f"cannot bind guest {guest}'s DNS relay: {e}") from None
    try:
        dnsrelay.start(socks, list(g.resolvers), g.control)
    except OSError as e:
        raise click.ClickException(f"cannot start guest {guest}'s DNS relay: {e}") from None


def _confine(config, guest: str) -> None:
    """Move this process into the guest's namespace, once it is there as set
    up, and drop the capabilities: never run a namespaced guest with the
    host's network."""
    from circuits.guestnet import GuestNetError, drift, enter
    from circuits.guestnet.errors import require_root
    from circuits.guestnet.namespace import ns_name
    from circuits.guestnet.ownership import Owned

    try:
        require_root(f"running in guest {guest}'s namespace")
        name = ns_name(guest)
        if problems := drift.guest_problems(guest, Owned(config.guestnet_state).netns_marker(name)):
            raise click.ClickException("the guest's namespace is not as set up, not running: "
                                       + "; ".join(problems))
        enter.confine(name)
    except GuestNetError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot enter guest {guest}'s namespace: {e}") from None


@main.group()
def guest() -> None:
    """Guests' network namespaces (for guests with `netns = true`; root only)."""


def _guestnet_call(fn, *args):
    from circuits.guestnet import GuestNetError

    try:
        return fn(*args)
    except GuestNetError as e:
        raise click.ClickException(str(e)) from None


@guest.command("up")
@click.argument("name")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file.")
def guest_up(name: str, config_path: str) -> None:
    """Make guest NAME's namespace with loopback only and its ruleset (or
    install the ruleset again in the one made before)."""
    from circuits.guestnet import network
    from circuits.guestnet.ownership import Owned

    config = _load(config_path)
    if not _guest(config, name).netns:
        raise click.ClickException(f"guest {name!r} has no namespace: set netns = true for it"
                                   f" in {config_path}")
    click.echo(_guestnet_call(network.up, Owned(config.guestnet_state), name))


@guest.command("down")
@click.argument("name")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file.")
def guest_down(name: str, config_path: str) -> None:
    """Remove guest NAME's namespace and ruleset, if circuits made them."""
    from circuits.guestnet import network
    from circuits.guestnet.ownership import Owned

    config = _load(config_path)
    _guest(config, name)
    click.echo(_guestnet_call(network.down, Owned(config.guestnet_state), name))


@guest.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The operator's TOML file.")
def guest_list(config_path: str) -> None:
    """Every guest: its namespace, ruleset, interfaces and dropped packets."""
    from circuits.guestnet import network
    from circuits.guestnet.errors import require_root
    from circuits.guestnet.ownership import Owned

    config = _load(config_path)
    _guestnet_call(require_root, "circuits guest list")
    owned = Owned(config.guestnet_state)
    rows = []
    for g in config.guests.values():
        st = _guestnet_call(network.status, owned, g.name)
        up = st.netns or g.netns
        rows.append({"name": g.name, "netns": ("yes" if st.netns else "MISSING") if up else "-",
                     "ruleset": ("ok" if st.ruleset_ok else "BROKEN") if up else "-",
                     "interfaces": st.interfaces if st.netns else "-",
                     "dropped": st.dropped if st.netns else "-", "mark": f"{g.mark:#x}",
                     "problems": st.problems if up else []})
    _table("guests", rows)


@main.group()
@click.option("--admin", "admin_path", default=None,
              help="The operator's admin socket (default: from --config, or /run/circuits/admin.sock).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="The operator's TOML file, to find its admin socket.")
@click.pass_context
def ctl(ctx: click.Context, admin_path: str | None, config_path: str | None) -> None:
    """Ask the running operator (root only)."""
    import tomllib

    from circuits.operator.config import DEFAULT_ADMIN_SOCKET

    if admin_path is None and config_path:
        # Only the admin socket's path: a file being edited may be invalid, and
        # `ctl reload` must still be able to say so.
        try:
            with open(config_path, "rb") as f:
                admin_path = tomllib.load(f).get("operator", {}).get("admin_socket")
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise click.ClickException(f"{config_path}: {e}") from None
    ctx.obj = admin_path or DEFAULT_ADMIN_SOCKET


def _ask(ctx: click.Context, cmd: str, **args):
    from circuits.operator.admin import request

    try:
        answer = request(ctx.obj, cmd, **args)
    except OSError as e:
        raise click.ClickException(f"cannot reach the operator at {ctx.obj}: {e.strerror or e}")
    if not answer["ok"]:
        raise click.ClickException(answer["error"])
    return answer["result"]


def _table(title: str, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for key in (rows[0] if rows else {}):
        table.add_column(key.replace("_", " "))
    for row in rows:
        table.add_row(*[", ".join(map(str, v)) if isinstance(v, list) else str(v)
                        for v in row.values()])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or logged: whole lines, no wrapped cells
    console.print(table if rows else f"{title}: none")


@ctl.command("status")
@click.pass_context
def ctl_status(ctx: click.Context) -> None:
    """The operator's state in one line each; drift as errors (exit 1)."""
    status = _ask(ctx, "status")
    errors = status.pop("errors", [])
    for key, value in status.items():
        click.echo(f"{key}: {value}")
    click.echo(f"errors: {len(errors)}")
    for error in errors:
        click.echo(f"error: {error}")
    ctx.exit(1 if errors else 0)


@ctl.command("guests")
@click.pass_context
def ctl_guests(ctx: click.Context) -> None:
    """Guests, their addresses, connections, listeners and circuits."""
    _table("guests", _ask(ctx, "guests"))


@ctl.command("circuits")
@click.pass_context
def ctl_circuits(ctx: click.Context) -> None:
    """Live circuits: endpoints, age, bytes each way (from the ring indices)."""
    _table("circuits", _ask(ctx, "circuits"))


@ctl.command("check")
@click.argument("source")
@click.argument("dest")
@click.argument("port", type=int)
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp")
@click.pass_context
def ctl_check(ctx: click.Context, source: str, dest: str, port: int, proto: str) -> None:
    """What the policy says of SOURCE (a guest) connecting to DEST (an address) PORT."""
    answer = _ask(ctx, "check", **{"from": source, "to": dest, "port": port, "proto": proto})
    click.echo(answer["verdict"])
    ctx.exit(0 if answer["allow"] else 1)


@ctl.command("reload")
@click.pass_context
def ctl_reload(ctx: click.Context) -> None:
    """Read the configuration again (a bad file keeps the running policy and
    published ports); exit 1 if a published port could not be bound."""
    answer = _ask(ctx, "reload")
    if isinstance(answer, str):  # an operator from before publish tables
        answer = {"reloaded": answer}
    errors = answer.pop("errors", [])
    for key, value in answer.items():
        click.echo(value if key == "reloaded" else f"{key}: {value}")
    for error in errors:
        click.echo(f"error: {error}")
    ctx.exit(1 if errors else 0)


@ctl.command("stop-proxystack")
@click.pass_context
def ctl_stop_proxystack(ctx: click.Context) -> None:
    """Stop the proxy stack for good, resetting every proxied connection (an
    operator's stop leaves it running); the operator's next start starts one."""
    click.echo(_ask(ctx, "stop-proxystack"))


@ctl.command("hosts")
@click.pass_context
def ctl_hosts(ctx: click.Context) -> None:
    """A hosts file of the guests' names and addresses (for /etc/hosts)."""
    click.echo(_ask(ctx, "hosts"), nl=False)


@ctl.command("metrics")
@click.pass_context
def ctl_metrics(ctx: click.Context) -> None:
    """Prometheus text metrics."""
    click.echo(_ask(ctx, "metrics"), nl=False)


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
@click.option("--count", default=1000, show_default=True, help="Setups per client per run.")
@click.option("--clients", default=4, show_default=True,
              help="Client processes at once for the rate (the latency rows have one).")
@click.option("--transport", "transports", multiple=True, type=click.Choice(["circuit", "preload", "tcp"]),
              help="Only these transports (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_setup(rounds: int, count: int, clients: int, transports: tuple[str, ...],
                as_json: bool) -> None:
    """Connection setups per second: through the operator vs TCP on loopback."""
    from rich.table import Table

    from circuits.bench import setup as setup_bench

    figures = setup_bench.run(rounds=rounds, count=count, clients=clients,
                              transports=transports or setup_bench.TRANSPORTS)
    out = setup_bench.as_json(figures)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    table = Table(title="setups: connect, 1-byte exchange, close (medians of rounds)")
    roles = ("operator", "client", "server")
    for col in ("transport", "clients", "setups/s", "p50", "p99", *roles):
        table.add_column(col if col not in roles else f"{col} CPU",
                         justify="left" if col == "transport" else "right")
    for f in figures:
        table.add_row(f.transport, str(f.clients), f"{f.per_second:,.0f}", f"{f.p50_us:.0f} us",
                      f"{f.p99_us:.0f} us", *(f"{f.cpu_us[r]:.0f} us" for r in roles))
    console = Console(width=None if sys.stdout.isatty() else 110)  # a log keeps every column
    console.print(table)
    for name, value in out["ratios"].items():
        console.print(f"{name}: [bold]{value:.2f}[/bold]")


@bench.command("egress")
@click.option("--rounds", default=5, show_default=True, help="Rounds; figures are medians.")
@click.option("--mib", default=1024, show_default=True, help="MiB per transfer.")
@click.option("--ring", default=4 << 20, show_default=True, help="Ring size per direction.")
@click.option("--connects", default=500, show_default=True, help="Setups per transport.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_egress(rounds: int, mib: int, ring: int, connects: int, as_json: bool) -> None:
    """Direct TCP vs the proxy stack as a worker and in the operator (64 KiB writes)."""
    from circuits.bench import egress

    out = egress.as_json(egress.run(rounds=rounds, total=mib << 20, ring=ring, connects=connects))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    egress.print_table(out, f"egress, {mib} MiB per transfer, 64 KiB writes (median of {rounds})",
                       Console())


@bench.command("apps")
@click.option("--rounds", default=3, show_default=True, help="Rounds; figures are medians.")
@click.option("--quick", is_flag=True, help="1 s runs and 10,000 requests (smoke tests).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_apps(rounds: int, quick: bool, as_json: bool) -> None:
    """iperf3, redis-benchmark and wrk+nginx: over circuits vs loopback TCP."""
    from circuits.bench import apps as apps_bench

    console = Console(stderr=as_json)
    try:
        with console.status("measuring") as status:
            figures = apps_bench.run(rounds=rounds, quick=quick,
                                     progress=lambda msg: status.update(msg))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(apps_bench.as_json(figures), indent=2))
    else:
        apps_bench.print_apps(figures, console)


if __name__ == "__main__":
    main()
