"""``edgekit station``: the inspection service over an ``edgekit update`` install root (issue 22).

One process: inputs (``inputs``: a watch folder, HTTP) submit ``jobs.Job``s to the service (``service.Station``),
whose one worker thread runs them in batches through the models (``models.StationModels``: the device's compiled
backbone once, the serving adapter and a trial on canary hold in numpy on the same pooled features, an optional
segmentation artifact, an optional drift scorer), decides OK/NG (``decision``), commits the results to SQLite
(``store``) and then hands them to the sinks (HTTP reply, Prometheus ``metrics``, MQTT ``mqtt``, the ``--review``
folder). The canary (``canary``) judges a trial on live images and promotes or rejects it through the install
root's state machine (``edgekit.device.state``). Nothing here imports torch.
"""
