"""A node behind a "NAT" that a client cannot reach, in network namespaces: its experts still serve.

Two namespaces hang off this host: the node's, which refuses every connection from outside
to its ports below 32768 (policy routing: it can dial out, as behind a home router, but nobody can
dial it), and the client's. The coordinator (DHT peer and relay) runs on this host. The node starts
with the default ``--reachability auto``: the relay's dial-back fails, so it serves through the
relay. The client, in its own namespace, checks that it cannot open a connection to the node's
gRPC port, then trains a RemoteMoE on the node's experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from markers import needs_root
from swarm_fixtures import HERE, CoordinatorProcess

from dmoe.testing.netlab import NetLab
from dmoe.testing.process import wait_ready_file

pytestmark = [pytest.mark.timeout(240), needs_root]
NODE_PORT = 31001  # below 32768: refused from outside the node's namespace
# (its DHT port is left to the system, 32768 and up: libp2p dials out from its listening port, and
# a stateless rule would refuse the answers too; a real NAT keeps state)

CLIENT = textwrap.dedent("""
    import json, socket, sys, torch
    from dmoe.moe.remote import RemoteMoE
    from dmoe.core.records import find_experts
    from dmoe.client.swarm import Swarm
    from dmoe.client.config import SwarmConfig

    swarm_address, node_ip, node_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        socket.create_connection((node_ip, node_port), timeout=3).close()
        direct = "connected"
    except OSError as e:
        direct = type(e).__name__
    with Swarm(SwarmConfig(initial_peers=[swarm_address], host=sys.argv[4], cache_ttl=60)) as swarm:
        records = find_experts(swarm.peer, [f"ffn.{i}" for i in range(4)])
        torch.manual_seed(0)
        layer = RemoteMoE(swarm, prefix="ffn", grid=(4,), in_features=16, k=2, k_min=2)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        losses, failed = [], 0
        x = torch.randn(64, 16)
        for _ in range(5):
            loss = (layer(x) - x.flip(-1)).square().mean()
            opt.zero_grad(); loss.backward(); opt.step()
            losses.append(loss.item()); failed += layer.last_num_failed
        layer.dispatcher.close()
    print(json.dumps({"direct": direct, "losses": losses, "failed": failed,
                      "dial": sorted({r.dial_endpoint for rs in records.values() for r in rs}),
                      "reachable": sorted({r.reachable for rs in records.values() for r in rs})}))
""")


def test_a_client_that_cannot_reach_the_node_trains_on_its_experts_through_the_relay(tmp_path):
    with NetLab() as node_lab, NetLab() as client_lab:
        for lab in (node_lab, client_lab):
            lab.route_to_host()
        node_lab.refuse_inbound(below=32768)
        coordinator = CoordinatorProcess(tmp_path, ["--host", node_lab.outer_ip], "coordinator")
        try:
            coordinator.start()
            relay_host = coordinator.ready["relay"].rsplit(":", 1)[0]
            assert relay_host == node_lab.outer_ip
            ready = tmp_path / "node.ready.json"
            with open(tmp_path / "node.log", "wb") as log:
                node = node_lab.popen(
                    [sys.executable, "-m", "dmoe", "node", "start", "--host", node_lab.inner_ip,
                     "--port", str(NODE_PORT), "--swarm", coordinator.swarm[0], "--experts", "ffn.[0:4]",
                     "--hidden-dim", "16", "--device", "cpu", "--ready-file", str(ready)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:
                    info = wait_ready_file(ready, node, 90, "the node behind the NAT")
                finally:
                    node_log = (tmp_path / "node.log").read_text(errors="replace")
                    print(node_log[-5000:])
            assert info["reachable"] is False, node_log
            assert info["relay_endpoint"].rsplit(":", 1)[0] == node_lab.outer_ip
            assert "cannot be dialled" in node_log

            client = subprocess.run(
                ["ip", "netns", "exec", client_lab.name, sys.executable, "-c", CLIENT, coordinator.swarm[0],
                 node_lab.inner_ip, str(NODE_PORT), client_lab.inner_ip],
                capture_output=True, text=True, timeout=150, env=dict(os.environ, PYTHONPATH=str(HERE)))
            assert client.returncode == 0, client.stderr[-3000:]
            result = json.loads(client.stdout.strip().splitlines()[-1])
            assert result["direct"] != "connected"  # the client really cannot reach the node
            assert result["dial"] == [info["relay_endpoint"]] and result["reachable"] == [False]
            assert result["failed"] == 0 and len(result["losses"]) == 5
            assert result["losses"][-1] < result["losses"][0]
        finally:
            coordinator.cleanup()
