"""Cluster mode: one coalescing namespace across processes and hosts.

Redis is the directory only: a prompt key maps to the address of the process
that owns its stream (a lease, renewed while the stream runs), or, for the
error TTL, to the failure it ended with. Chunks never travel through Redis:
a process that finds a key owned elsewhere reads the owner's log over an
internal HTTP stream, as one more subscriber of the owner's actor, and its
own identical requests join that relay. The coalescer (``actors/``) sees a
remote owner only as a Source (``actors.ports.OpenRelay``).

- ``wire``: the internal stream's lines and the directory's values (sans-IO);
- ``directory``: the Redis leases, failing open;
- ``peer``: the client side of the internal hop;
- ``routes``: the internal listener's side;
- ``member``: this process as a member: the decision per request, the
  owner's duties (renew, release, record a failure).
"""
