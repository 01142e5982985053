"""Fleet updates on The Update Framework (python-tuf): an adapter repository (``repository``), the device
updater (``update``), the health check (``health``) and the one definition of a backbone's identity
(``backbone``). Needs tuf, securesystemslib and cryptography: part of the runtime (``pip install edgekit``),
since ``update`` runs on the station; the ``ota`` extra still names them.
"""
