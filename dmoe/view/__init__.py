"""dmoe.view: the swarm as people see it, computed from the nodes' own records.

- ``config.py``     StatusConfig: the options of ``dmoe swarm status``
- ``swarmview.py``  SwarmView, ThroughputHistory: the swarm summarized from node records
- ``status.py``     read_view, render: ``dmoe swarm status``
"""
