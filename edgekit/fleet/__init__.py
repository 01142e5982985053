"""Fleet updates on The Update Framework (python-tuf): an adapter repository (``repository``), the device
updater (``update``), the health check (``health``) and the one definition of a backbone's identity
(``backbone``). Needs the optional packages of the ``ota`` extra (tuf, securesystemslib, cryptography).
"""
