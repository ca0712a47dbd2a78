"""dmoe.client: how a client reaches experts in the swarm.

- ``swarm.py``     Swarm, SwarmConfig: the client's DHT peer, live-expert cache, endpoint health
- ``dispatch.py``  Dispatcher, ExpertCall: calls in flight at once, deadlines, per-token quorum, reply checks
"""
