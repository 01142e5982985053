"""The device side's own state: what an install root serves, tries, refuses and trusts (``edgekit.device.state``).

A low layer (it imports only the base modules), so the OTA installer, ``edgekit update``, the runtime and a
station all change the install root through the same named transitions.
"""
