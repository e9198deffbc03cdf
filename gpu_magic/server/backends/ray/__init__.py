"""The ``ray`` backend: a Ray cluster's GPU nodes as the pool, each job a Ray task (see docs/ray.md).

Importing this needs Ray (``pip install 'gpu-magic[ray]'``); the gateway imports it only for
``gpu-magic serve --backend ray``.
"""

from __future__ import annotations

from ._backend import BlobRefs, RayBackend
from ._pool import PoolConfigError, TypeMap, parse_autoscale

__all__ = ["BlobRefs", "PoolConfigError", "RayBackend", "TypeMap", "parse_autoscale"]
