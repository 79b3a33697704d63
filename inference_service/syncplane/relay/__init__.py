"""The sync relay: the sync plane's public gRPC server, in a process of its own.

process.py is that program; supervisor.py, in the inference service, starts it, starts it
again should it die, and serves the pushes it relays. Each push's parts cross between the two
over a push link: link.py is the link and its relay end, service_end.py the service's end,
frames.py what crosses; pulse.py is the heartbeat by which the relay tells a stuck service from
a busy one.
"""
