"""Python stubs of the kiln.v1 gRPC API, generated from ``protos/`` by ``protos/generate.py``.

The ``*_pb2*.py`` modules here are build outputs (``pip install`` runs the generator), never edited
by hand and not kept in git; after changing a .proto, run ``python protos/generate.py``.
Only the gateway (``kilnlm.actors.gateway``) and the client (``kilnlm.client``,
``kilnlm.client_messages``) import them.
"""
