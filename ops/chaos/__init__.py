"""A randomized fault schedule against a whole inferq system (issue 22): a 3-node NATS cluster, two api
processes and two sim workers under a mixed workload, while a seeded schedule SIGKILLs or SIGSTOPs one of them
every few seconds and brings it back; then the invariants (docs/reliability.md). Used by
tests/integration/test_chaos.py and by `inferq chaos` (ops/chaos/cli.py)."""
