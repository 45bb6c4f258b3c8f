"""Ports, timeouts, limits and environment-variable names shared by client and node."""

from __future__ import annotations

#: TCP port a node server listens on when none is given (dispy uses 9701; we avoid
#: clashing with a dispy node running on the same machine).
NODE_PORT = 9711

#: TCP port of the shared scheduler (``dispynb-scheduler``) for its clients (dispy's
#: ``SharedSchedulerPort`` = 9702 shifted as the node port is).
SCHEDULER_PORT = 9712

#: TCP port ``dispynb-scheduler --register_port`` listens on for nodes that register
#: themselves (``dispynb-node --register HOST:9714``, or dispynode's
#: ``--scheduler_host HOST``, which means this port).
SCHEDULER_REGISTER_PORT = 9714

#: UDP port nodes listen on for discovery pings (on by default, as dispynode).
DISCOVERY_PORT = 9712

#: UDP port clients listen on for the announcements nodes send when they start: always
#: the discovery port plus one (``--discovery-port`` moves both, as dispy's port did).
DISCOVERY_CLIENT_PORT = DISCOVERY_PORT + 1

#: IPv4 multicast group of discovery with ``ipv4_udp_multicast=True`` (dispy's group).
IPV4_MULTICAST_GROUP = "239.255.61.59"

#: Most directories a computation's ``dest_path`` may name (each cut to 64
#: characters on the node). A node takes one more: the directory a shared
#: scheduler puts each user's ``dest_path`` in.
MAX_DEST_PATH_PARTS = 32

#: Largest frame accepted before authentication: handshake messages are tiny.
PRE_AUTH_MAX_FRAME = 64 * 1024

#: Default largest message accepted after authentication (configurable on both sides).
MAX_MESSAGE_SIZE = 1024 * 1024 * 1024

#: Seconds allowed for the whole handshake (connect excluded).
HANDSHAKE_TIMEOUT = 5.0

#: Shortest and longest interval (s) between a node's status reports to a client
#: (dispy's ``pulse_interval``): a node holds a client's wish to this range.
PULSE_RANGE = (0.1, 1000.0)

#: Seconds allowed for a TCP connect.
CONNECT_TIMEOUT = 10.0

#: Seconds a client keeps retrying (with back-off) a connection that a node refused
#: as busy or cut during the handshake.
CONNECT_RETRY = 10.0

#: Environment variable holding the shared secret.
SECRET_ENV = "DISPYNB_SECRET"

#: Environment variable naming a file that holds the shared secret.
SECRET_FILE_ENV = "DISPYNB_SECRET_FILE"

#: Environment variable naming the engine a `LocalCluster` and ``%dispy local`` start
#: by default: ``nodes`` (dispynb's node servers) or ``dask`` (a Dask cluster on this
#: machine); the example notebooks run on Dask with it set.
LOCAL_ENGINE_ENV = "DISPYNB_LOCAL_ENGINE"

#: Jobs kept in flight per CPU of a node, at least (more when jobs are short).
MIN_JOBS_PER_CPU = 2

#: Upper bound of jobs kept in flight per CPU of a node.
MAX_JOBS_PER_CPU = 32
