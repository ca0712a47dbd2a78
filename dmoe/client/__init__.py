"""dmoe.client: how a client reaches experts in the swarm.

- ``config.py``    SwarmConfig: how a client joins a swarm and treats its peers (torch-free)
- ``swarm.py``     Swarm: the client's DHT peer, live-expert cache, and its endpoint health
- ``dispatch.py``  Dispatcher, ExpertJob, ExpertCall: calls in flight at once, deadlines, per-token quorum,
                   failover between an expert's replicas, reply checks
- ``channels.py``  ChannelCache: the Dispatcher's gRPC channels, the most recently used 1024 kept, a
                   dropped one closed once its calls have ended
- ``balance.py``   ReplicaBalancer: which replica a call goes to (expected finish time), how a big
                   sub-batch is spread over replicas
- ``spotcheck.py`` SpotChecker: spot checks of an expert's answers against its other replicas, the
                   liar settled by a third and quarantined
- ``health.py``    EndpointHealth: back-off of failing endpoints, quarantine of misbehaving experts;
                   is_misbehaviour and the errors it judges (Late, LocalInputError, Disagreement)
"""
