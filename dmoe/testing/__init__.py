"""dmoe.testing: lab tools for tests, benchmarks and the demo. Shipped, never imported by the library.

- ``process.py``   wait_ready_file, stop_process_group: child processes that announce themselves
- ``chaos.py``     ChaosRun, ChaosConfig: a swarm that trains while its nodes are killed, frozen, cut off
- ``netproxy.py``  TcpProxy: a userspace proxy that delays or cuts loopback links and counts bytes
- ``byzantine.py`` AveragingPeers, poison: trainers' averagers in one process, one hostile (BTARD's attacks)
- ``netlab.py``    NetLab: a network namespace behind a veth link shaped by tc tbf (needs root)
"""
