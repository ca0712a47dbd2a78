"""dmoe.moe: the MoE layer a model holds.

- ``gating.py``  MoELayer: gates, top-k / Switch routing, hedging, aux and z losses, the combine;
                 the base of both layers below
- ``remote.py``  RemoteMoE: the layer whose experts run on nodes of the swarm (autograd through them)
- ``local.py``   LocalMoE: the same layer with its experts in this process (reference and baseline)
"""
