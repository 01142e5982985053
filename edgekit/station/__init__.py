"""``edgekit station``: the inspection service on a device, over an ``edgekit update`` install root.

Inputs (a watch folder, HTTP) feed one worker that runs the deployed backbone and adapter, decides OK/NG, commits
each result to SQLite (``store``), and then publishes it (``mqtt``) and counts it (``metrics``). It imports no torch.
"""
