"""Planning: model profiles, cluster inventory, cost model v2 and the partition.

Purely data-manipulative and computational: no kopf, no Kubernetes client, no torch,
no network. Functions take data and return data.
"""
