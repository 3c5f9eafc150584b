"""The proxy stack: the host's own TCP stack speaking for guests (docs/proxystack.md).

A process the operator starts (main.py; or, with placement "operator", the
same service on the operator's loop: inprocess.py).  It connects back to the
operator over its own control socket as the identity "proxystack", opens host
sockets for the guests' egress circuits (EGRESS), listens on the published
ports the operator names (PUBLISH, on every link and reload), hands what it
accepts to guests' listeners (INGRESS), and moves bytes between each host
socket and its circuit with no copy of its own: the kernel reads from and
writes into the circuit's memory (service.py).  The worker
outlives the operator and says HELLO to the next one.
"""
