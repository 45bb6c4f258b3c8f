"""The shared scheduler (``dispynb-scheduler``): many clients, one set of nodes.

To its clients it looks like one node server (same protocol, same handshake, with a
per-user credential instead of the node secret); towards the nodes it is one more
client, holding the node secret. It relays each client's computation to every node
and keeps the jobs in its own queues, handing each free CPU to the user with the
fewest jobs running (`fairshare`). It never unpickles what clients send: payloads
travel through it as opaque buffers.
"""
