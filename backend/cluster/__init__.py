"""EXECUTOR=ray: the model on many devices and machines, one engine per device, on Ray.

facade.py: ClusterBackend, the HFBackend interface routed to workers; worker.py: the actor
that holds one HFBackend; workers.py: starting and stopping actors; placement.py: which worker
holds which adapter; mirror.py: the server's records of remote adapters; recovery.py: faults,
rejoining, moves and sampler replicas; views.py: the workers' figures summed. See docs/cluster.md.
"""

from backend.cluster.facade import ClusterBackend

__all__ = ["ClusterBackend"]
