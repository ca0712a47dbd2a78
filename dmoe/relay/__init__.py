"""dmoe.relay: the relay that serves nodes nobody can dial (behind a NAT), over connections they dial.

- ``server.py``    Relay: probe, register, attach; per-node and per-client limits
- ``protocol.py``  the JSON-line protocol both sides speak, splice (the byte pipe)
- ``limits.py``    RelayLimits: what one relay serves at most, and its protocol's timers
- ``dialback.py``  dial_back: a relay's probe of a node's port, and the Info call that checks who answers
"""
