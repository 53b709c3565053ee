"""The test clusters of real nats-server processes (ops/chaos/cluster.py)."""

from __future__ import annotations

import socket

from ops.chaos.cluster import NatsCluster


def test_a_cluster_whose_picked_port_was_taken_meanwhile_starts_on_new_ports(tmp_path) -> None:
    # A port is free when picked and bound only when the node starts; in between an outgoing connection (another
    # node dialling its routes) can be given it. CI saw "bind: address already in use" and a failed module.
    cluster = NatsCluster(tmp_path, size=2)
    taken = cluster.nodes[1].route_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert all(node.running for node in cluster.nodes)
            assert cluster.nodes[1].route_port != taken
            assert "address already in use" in cluster.nodes[1].log()  # the first attempt did hit it
