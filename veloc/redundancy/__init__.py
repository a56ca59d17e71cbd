"""Redundancy layer: copies of a node's data on other nodes.

Failure domains and groups (``topology``), file transfers between the nodes' engines over
MPI (``transfer``), erasure groups on disk and their encode/rebuild exchanges
(``striping``) and the erasure codes themselves (``erasure_codec``). Used by the partner
and erasure modules of the engine.
"""
