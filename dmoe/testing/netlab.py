"""NetLab: a host of its own on this machine, in a network namespace behind a shaped veth link.

For tests and benchmarks of what crosses a network: ``NetLab()`` creates a namespace and a veth
pair (``10.<a>.<b>.1`` here, ``.2`` in the namespace, a /30 of its own per lab), and ``shape(mbit)``
limits both directions with ``tc ... tbf`` (netem is not available here, so latency, jitter and cuts
come from :class:`dmoe.testing.netproxy.TcpProxy`); ``set_link(False)`` cuts the namespace off the
network until ``set_link(True)``; ``route_to_host()`` makes every address of this host reachable from
inside, and ``refuse_inbound()`` lets the namespace dial out but not be dialled (a home router's NAT).
``popen(argv)`` starts a process inside the namespace.
Everything it made is removed by ``close()`` (or the ``with`` block), processes first. It needs root
(``ip netns``), and uses only addresses inside the namespaces it creates.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess

from dmoe.testing.process import stop_process_group

logger = logging.getLogger(__name__)

_counter = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetLab:
    def __init__(self, name: str | None = None):
        n = next(_counter)
        tag = f"{os.getpid() % 100000}{n}"
        self.name = name or f"dmoe-{tag}"
        self.outer_if, self.inner_if = f"dmv{tag}a"[:15], f"dmv{tag}b"[:15]
        subnet = (os.getpid() * 7 + n) % (64 * 256)  # a /30 in 10.200.0.0/10 .. per lab
        base = f"10.{200 + subnet // 4096}.{(subnet // 16) % 256}.{(subnet % 16) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.outer_ip, self.inner_ip = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
        self._procs: list[subprocess.Popen] = []
        self._made = False

    def start(self) -> NetLab:
        try:
            _ip("netns", "add", self.name)
            self._made = True
            _ip("link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if)
            _ip("link", "set", self.inner_if, "netns", self.name)
            _ip("addr", "add", f"{self.outer_ip}/30", "dev", self.outer_if)
            _ip("link", "set", self.outer_if, "up")
            for args in (("addr", "add", f"{self.inner_ip}/30", "dev", self.inner_if),
                         ("link", "set", self.inner_if, "up"), ("link", "set", "lo", "up")):
                _ip("netns", "exec", self.name, "ip", *args)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            self.close()
            detail = getattr(e, "stderr", "") or str(e)
            raise RuntimeError(f"cannot make network namespace {self.name} "
                               f"(root and iproute2 needed): {detail}")
        return self

    def shape(self, mbit: float | None) -> None:
        """Limit each direction to ``mbit`` Mbit/s with a token bucket (None: unlimited)."""
        for tc, dev in (["tc"], self.outer_if), (["ip", "netns", "exec", self.name, "tc"], self.inner_if):
            subprocess.run([*tc, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if mbit is not None:
                burst = max(32_000, int(mbit * 1e6 / 8 / 100))  # >= 10 ms of traffic
                subprocess.run([*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                                "burst", str(burst), "latency", "400ms"], check=True, capture_output=True)

    def set_link(self, up: bool) -> None:
        """Take the namespace's end of the link down (the cable pulled: packets to it are lost, open
        connections stall until their deadlines) or bring it back up; addresses and routes come back."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.inner_if, "up" if up else "down")

    def route_to_host(self) -> None:
        """A default route through the link: every address of this host is reachable from inside."""
        _ip("netns", "exec", self.name, "ip", "route", "replace", "default", "via", self.outer_ip)

    def refuse_inbound(self, below: int = 32768) -> None:
        """Connections from outside to ports below ``below`` are refused: the namespace can dial out
        (its own connections use ports from 32768 up) but cannot be dialled, as behind a home router.
        Policy routing (there is no iptables here): such packets match a 'prohibit' rule that is
        looked up before the table of local addresses."""
        run = ("netns", "exec", self.name, "ip", "rule")
        _ip(*run, "add", "pref", "10", "iif", self.inner_if, "ipproto", "tcp", "dport", f"1-{below - 1}",
            "prohibit")
        _ip(*run, "add", "pref", "100", "table", "local")
        _ip(*run, "del", "pref", "0")

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace, in a process group of its own; stopped by close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            stop_process_group(proc, 20)
        self._procs.clear()
        subprocess.run(["ip", "link", "del", self.outer_if], capture_output=True)
        if self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self._made = False

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
