"""The loopback JetStream cluster lives in ops.chaos.cluster (the chaos run uses it too); tests import it here."""

from ops.chaos.cluster import ClusterNode, NatsCluster

__all__ = ["ClusterNode", "NatsCluster"]
