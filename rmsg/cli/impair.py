"""``rmsg netem`` and ``rmsg netem ctl``: a UDP relay through a faulty link, and its control."""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from netem.proxy import ProxyFailed, UdpProxy

from . import render
from .app import CONTEXT, group
from .options import DURATION, fail

# ------------------------------------------------------------------------ netem


@group(invoke_without_command=True)
@click.option("--listen", default=None, metavar="HOST:PORT", help="Where clients send. [required]")
@click.option(
    "--forward", default=None, metavar="HOST:PORT", help="The server to relay to. [required]"
)
@click.option("--spec", default=None, help="tc-netem impairment for both directions.")
@click.option("--up", default=None, help="Impairment client -> server (overrides --spec).")
@click.option("--down", default=None, help="Impairment server -> client (overrides --spec).")
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A TOML timeline of phases, partitions and flaps (see docs/netem.md).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for every decision: the same seed replays the same faults.",
)
@click.option(
    "--pcap-in",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture what arrives, before impairment.",
)
@click.option(
    "--pcap-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture what is sent on, after impairment.",
)
@click.option(
    "--capture",
    type=click.Path(dir_okay=False),
    default=None,
    help="Capture both legs to one pcapng (client leg, server leg), "
    "each datagram's fault decision as a packet comment.",
)
@click.option(
    "--replies",
    type=click.Choice(["learn", "relay", "strict"]),
    default="learn",
    show_default=True,
    help="Replies from another port of the server's host: relay them and send the "
    "client's next datagrams there (learn), only relay them (relay), or drop them (strict).",
)
@click.option(
    "--rebind-every",
    type=DURATION,
    default=None,
    help="NAT rebinding: give each client a new upstream port this often.",
)
@click.option(
    "--client-idle-timeout",
    type=DURATION,
    default=120.0,
    show_default=True,
    help="Forget a client (and close its upstream port) after this long without a datagram.",
)
@click.option(
    "--max-clients",
    type=click.IntRange(min=1),
    default=None,
    help="Clients held at once; more are refused and counted. "
    "[default: 4096, or what the descriptor limit (ulimit -n) leaves]",
)
@click.option(
    "--duration", type=DURATION, default=None, help="Stop after this long (default: until Ctrl-C)."
)
@click.option(
    "--control",
    default=None,
    metavar="HOST:PORT",
    help="Serve the control API (rmsg netem ctl) here; loopback only, no authentication.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the exit counters as JSON.")
@click.pass_context
def netem(
    ctx: click.Context,
    listen: str | None,
    forward: str | None,
    spec: str | None,
    up: str | None,
    down: str | None,
    scenario: str | None,
    seed: int,
    pcap_in: str | None,
    pcap_out: str | None,
    capture: str | None,
    replies: str,
    rebind_every: float | None,
    client_idle_timeout: float,
    max_clients: int | None,
    duration: float | None,
    control: str | None,
    as_json: bool,
) -> None:
    """Relay UDP between clients and a server through a faulty link.

    Any UDP application works, not only rmsg. Clients send to --listen; each
    gets its own upstream socket towards --forward (like a NAT). Impairments
    use tc-netem syntax; the same --seed replays the same decisions. Counters
    are printed when it stops (Ctrl-C, SIGTERM or --duration). New clients
    beyond --max-clients or the descriptor limit are refused and counted, the
    others keep being relayed. Exit status: 0 after a normal stop, 1 if the
    relay could not start or failed (the OS's error is named: an address in
    use, a capture that cannot be written), 2 for bad options.

    \b
    Examples:
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --spec "loss 10%"
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 \\
          --up "delay 20ms 5ms loss 2%" --down "delay 20ms duplicate 1%" --pcap-out out.pcap
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --scenario flaky.toml
      rmsg netem --listen 127.0.0.1:9000 --forward 127.0.0.1:7000 --control 127.0.0.1:9001
      rmsg netem ctl --control 127.0.0.1:9001 set "loss 30%" --direction up
    """
    if ctx.invoked_subcommand is not None:
        given = [
            name
            for name in ("listen", "forward", "spec", "up", "down", "scenario")
            if ctx.params.get(name) is not None
        ]
        if given:
            raise click.UsageError(f"--{given[0]} belongs to the proxy, not to 'rmsg netem ctl'")
        return
    if listen is None or forward is None:
        missing = "--listen" if listen is None else "--forward"
        raise click.UsageError(f"Missing option '{missing}' (or a subcommand: ctl)")
    from netem.proxy import UdpProxy
    from netem.scenario import Scenario
    from netem.spec import format_spec, parse_spec

    if scenario is not None and (spec or up or down):
        raise click.UsageError("give either --scenario or --spec/--up/--down, not both")
    # a spec or scenario that does not parse is a usage error (app.library_errors)
    timeline = Scenario.from_toml(pathlib.Path(scenario)) if scenario else None
    up_imp = parse_spec(up if up is not None else spec or "")
    down_imp = parse_spec(down if down is not None else spec or "")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            proxy = UdpProxy(
                listen,
                forward,
                up=None if timeline else up_imp,
                down=None if timeline else down_imp,
                scenario=timeline,
                seed=seed,
                pcap_in=pcap_in,
                pcap_out=pcap_out,
                capture=capture,
                replies=replies,
                rebind_every=rebind_every,
                idle_timeout=client_idle_timeout,
                max_clients=max_clients,
                control=control,
            )
    except socket.gaierror as exc:  # a name that does not resolve: fix the option
        raise click.UsageError(f"cannot resolve the address: {exc.strerror}") from None
    except OSError as exc:  # in use, not ours, an unwritable capture: the OS said no
        raise fail(f"cannot start the proxy: {exc}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for warning in caught:
        click.echo(f"netem: warning: {warning.message}", err=True)
    described = (
        f"scenario {scenario}"
        if timeline
        else f"up: {format_spec(up_imp) or 'clean'}; down: {format_spec(down_imp) or 'clean'}"
    )
    click.echo(render.proxy_started(proxy, described, seed), err=True)
    started = time.monotonic()
    failure = _relay(proxy, duration)
    stats = proxy.snapshot()
    if as_json:
        render.echo_json(stats.as_dict(), indent=2)
    else:
        click.echo(render.netem_summary(stats, time.monotonic() - started))
    if failure is not None:
        raise fail(str(failure))


def _relay(proxy: UdpProxy, duration: float | None) -> ProxyFailed | None:
    """Run the relay until Ctrl-C, SIGTERM or --duration; what failed it, if anything did."""
    from netem.proxy import ProxyFailed

    started = time.monotonic()
    failure: ProxyFailed | None = None
    with _terminate_as_interrupt():
        proxy.start()
        try:
            # wait() raises as soon as the relay thread fails, so a dead relay ends the run
            while duration is None or time.monotonic() - started < duration:
                proxy.wait(0.05 if duration is None else min(0.05, duration))
        except KeyboardInterrupt:
            pass
        except ProxyFailed:
            pass  # stop() raises it again, after closing everything
        finally:
            try:
                proxy.stop()
            except ProxyFailed as exc:
                failure = exc
    return failure


@netem.group(context_settings=CONTEXT)
@click.option(
    "--control",
    required=True,
    envvar="RMSG_NETEM_CONTROL",
    metavar="HOST:PORT",
    help="The proxy's control address (its --control). [env: RMSG_NETEM_CONTROL]",
)
@click.option(
    "--timeout", type=DURATION, default=5.0, show_default=True, help="Give up after this."
)
@click.pass_context
def ctl(ctx: click.Context, control: str, timeout: float) -> None:
    """Change the faults of a running proxy (started with --control).

    \b
    Examples:
      rmsg netem ctl --control 127.0.0.1:9001 get
      rmsg netem ctl --control 127.0.0.1:9001 set "delay 50ms loss 5%"
      rmsg netem ctl --control 127.0.0.1:9001 set "loss 100%" --client 127.0.0.1:5353
      rmsg netem ctl --control 127.0.0.1:9001 partition --direction up
      rmsg netem ctl --control 127.0.0.1:9001 heal
      rmsg netem ctl --control 127.0.0.1:9001 clear
    """
    ctx.obj = (control, timeout)


def _ctl_request(ctx: click.Context, method: str, path: str, body: dict[str, Any] | None) -> None:
    import http.client

    from netem.control import is_loopback
    from netem.proxy import parse_hostport

    control, timeout = ctx.obj
    try:
        host, port = parse_hostport(control)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--control") from None
    if not is_loopback(host):
        raise click.BadParameter(
            "the control API only listens on loopback (127.0.0.1, ::1)", param_hint="--control"
        )
    # http.client, not urllib: no proxy from the environment may see this request
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        payload = json.loads(response.read() or b"{}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise fail(f"cannot reach the netem control API at {control}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise fail(str(payload.get("error", f"HTTP {response.status}")))
    render.echo_json(payload, indent=2)


_DIRECTION = click.option(
    "--direction",
    type=click.Choice(["up", "down", "both"]),
    default="both",
    show_default=True,
    help="up: client -> server; down: server -> client.",
)
_CLIENT = click.option(
    "--client",
    default=None,
    metavar="HOST[:PORT]",
    help="Only this client (a host means all its ports); the others are spared.",
)


@ctl.command("get", context_settings=CONTEXT)
@click.pass_context
def ctl_get(ctx: click.Context) -> None:
    """Print the faults in force (JSON)."""
    _ctl_request(ctx, "GET", "/faults", None)


@ctl.command("stats", context_settings=CONTEXT)
@click.pass_context
def ctl_stats(ctx: click.Context) -> None:
    """Print the proxy's counters so far, each client's too (JSON)."""
    _ctl_request(ctx, "GET", "/stats", None)


@ctl.command("set", context_settings=CONTEXT)
@click.argument("spec", required=False)
@click.option("--up", default=None, help="Spec for client -> server only.")
@click.option("--down", default=None, help="Spec for server -> client only.")
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_set(
    ctx: click.Context,
    spec: str | None,
    up: str | None,
    down: str | None,
    direction: str,
    client: str | None,
) -> None:
    """Put a tc-netem SPEC in force from now on (replacing the start-up one)."""
    if spec is None and up is None and down is None:
        raise click.UsageError('give a SPEC (or --up/--down), e.g. set "loss 10%"')
    body = {"spec": spec, "up": up, "down": down, "direction": direction, "client": client}
    _ctl_request(ctx, "POST", "/set", body)


@ctl.command("clear", context_settings=CONTEXT)
@_CLIENT
@click.pass_context
def ctl_clear(ctx: click.Context, client: str | None) -> None:
    """Remove every fault (or, with --client, that client's own rules)."""
    _ctl_request(ctx, "POST", "/clear", {"client": client})


@ctl.command("partition", context_settings=CONTEXT)
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_partition(ctx: click.Context, direction: str, client: str | None) -> None:
    """Cut the link (one direction or both) until healed."""
    _ctl_request(ctx, "POST", "/partition", {"direction": direction, "client": client})


@ctl.command("heal", context_settings=CONTEXT)
@_DIRECTION
@_CLIENT
@click.pass_context
def ctl_heal(ctx: click.Context, direction: str, client: str | None) -> None:
    """End partitions."""
    _ctl_request(ctx, "POST", "/heal", {"direction": direction, "client": client})


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while running, so counters still print when killed."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
