"""``edgekit station ROOT [options]``: the inspection service over an install root; ``edgekit station status|promote|
reject ROOT``: what it is doing, and the operator's canary override."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from edgekit.commands._common import echo_json, json_option, threads_option
from edgekit.errors import EdgekitError
from edgekit.utils import parse_host_port

DEFAULT_MIN_AGREEMENT = 0.95
DEFAULT_TOPIC = "edgekit"
DB_NAME = "station.db"
SUBCOMMANDS = ("run", "status", "promote", "reject")


def _note(text: str) -> None:
    from edgekit.progress import write_stderr

    write_stderr(text)


def parse_addr(text: str, option: str, local_only: bool = False) -> tuple:
    """``HOST:PORT`` -> (host, port) through the shared parser (``edgekit.utils.parse_host_port``); ``local_only``:
    a server this station opens (--http, --metrics) binds a literal IP address."""
    return parse_host_port(text, option, listen=local_only,
                           example="127.0.0.1:1883" if option == "--mqtt" else "127.0.0.1:8080")


def _lock_station(db_path: Path):
    """Take the exclusive lock of ``DB.lock`` (kept as an empty file); the returned close() releases it."""
    import fcntl

    lock_path = Path(f"{db_path}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise EdgekitError(f"another station is already running on {db_path} (it holds {lock_path}); stop it "
                           "first") from None
    return lambda: os.close(fd)


def _require(option: str, *modules: str) -> None:
    import importlib.util

    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise EdgekitError(f"{option} needs the optional package {m}: pip install 'edgekit[station]'")


class StationGroup(click.Group):
    """``edgekit station ROOT ...`` runs the service (the ``run`` command) and ``edgekit station status|promote|reject
    ROOT`` are subcommands: a first word that is not a subcommand (nor --help) is the service's ROOT."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("station", cls=StationGroup)
def station_group():
    """The inspection station over an edgekit update install root: edgekit station ROOT [--watch DIR] [--http
    127.0.0.1:PORT] [...] runs it (see edgekit station run --help); status, promote and reject ROOT are its
    subcommands."""


@station_group.command("run")
@click.argument("root", type=click.Path(), metavar="ROOT")
@click.option("--watch", "watch", type=click.Path(), default=None, metavar="DIR",
              help="Inspect every complete image file that appears in DIR (and those already there).")
@click.option("--http", "http", default=None, metavar="127.0.0.1:PORT",
              help="POST /infer an image, get the result as JSON; GET /status.")
@click.option("--segment", type=click.Path(), default=None, metavar="ARTIFACT",
              help="A GMBINet artifact: defect masks become regions (area, box, peak) in every result.")
@click.option("--config", "config_path", type=click.Path(), default=None, metavar="FILE",
              help="TOML thresholds for OK/NG ([decision], [segment], [drift]).")
@click.option("--db", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=f"SQLite results (default ROOT/{DB_NAME}).")
@click.option("--canary", type=click.IntRange(min=1), default=None, metavar="N",
              help="Record a canary policy in ROOT: edgekit update holds a trial that passed its health check, and "
                   "the station runs it in shadow on N live images before promoting or rejecting it.")
@click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=None, metavar="A",
              help=f"With --canary: the share of images where the trial must agree with the serving adapter "
                   f"(default {DEFAULT_MIN_AGREEMENT}).")
@click.option("--mqtt", default=None, metavar="HOST:PORT", help="Publish every result (QoS 1) and a retained status.")
@click.option("--topic", default=DEFAULT_TOPIC, show_default=True, help="MQTT topic prefix shared by a fleet.")
@click.option("--metrics", default=None, metavar="127.0.0.1:PORT", help="Prometheus metrics at /metrics.")
@click.option("--review", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Copy images flagged as unlike the training data to DIR/inbox for labelling.")
@click.option("--backbone-artifact", type=click.Path(), default=None, metavar="DIR",
              help="The compiled backbone artifact (default: the one ROOT/backbone.json records).")
@threads_option()
@click.option("--batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Images per batch.")
@click.option("--station-id", default=None, metavar="ID", help="This station's name (default: the host name).")
def run_cmd(root, watch, http, segment, config_path, db, canary, min_agreement, mqtt, topic, metrics, review,
            backbone_artifact, threads, batch, station_id):
    """Run the station: inputs -> models -> OK/NG -> SQLite, then MQTT, metrics, review. Stops cleanly on SIGTERM
    or Ctrl-C (queued images are finished and committed first)."""
    from edgekit.device.state import InstallRoot, check_canary_policy

    root_path = Path(root)
    if not root_path.is_dir():
        raise EdgekitError(f"install root {root} does not exist (edgekit update --root {root} creates it)")
    if not watch and not http:
        raise EdgekitError("give an input: --watch DIR and/or --http 127.0.0.1:PORT")
    if watch and not Path(watch).is_dir():
        raise EdgekitError(f"--watch {watch}: not a folder")
    if watch and review:
        # flagged images are copied into DIR/inbox: watched, they come back as new images, are flagged and copied
        # again (1,000 rows of one image in seconds, until the inbox is full)
        inbox, watched = (Path(review) / "inbox").resolve(), Path(watch).resolve()
        if watched == inbox or inbox in watched.parents:
            raise EdgekitError(f"--watch {watch} is inside {inbox}, where --review copies flagged images: they "
                               "would be inspected again; watch another folder")
    http_addr = parse_addr(http, "--http", local_only=True) if http else None
    metrics_addr = parse_addr(metrics, "--metrics", local_only=True) if metrics else None
    mqtt_addr = parse_addr(mqtt, "--mqtt") if mqtt else None
    if min_agreement is not None and canary is None:
        raise EdgekitError("--min-agreement goes with --canary N")
    policy = check_canary_policy({"images": canary, "min_agreement": DEFAULT_MIN_AGREEMENT if min_agreement is None
                                  else min_agreement}) if canary else None
    if watch:
        _require("--watch", "watchdog")
    if mqtt:
        _require("--mqtt", "paho")
    if metrics:
        _require("--metrics", "prometheus_client")
    from edgekit.station.decision import StationConfig
    from edgekit.station.models import StationModels
    from edgekit.station.service import Station

    config = StationConfig.load(config_path)
    db_path = Path(db) if db else root_path / DB_NAME
    if not db_path.parent.is_dir():
        raise EdgekitError(f"--db {db_path}: folder {db_path.parent} does not exist")
    models = StationModels(root_path, backbone_artifact=backbone_artifact, segment=segment, threads=threads,
                           drift=config.drift_enabled)
    try:
        config.check_classes(models.serving.classifier.classes)
    except EdgekitError:
        models.close()
        raise
    station_id = station_id or os.uname().nodename
    stop = threading.Event()  # set by SIGTERM / SIGINT: from here on a signal is a clean stop, never a kill
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    opened = {}  # what to close, in this order: inputs, then the worker (it finishes the queue), then the sinks
    order = ("watch", "http", "station", "mqtt", "metrics", "lock")
    station = None
    try:
        sinks = {}
        if metrics_addr:
            from edgekit.station.metrics import StationMetrics

            sinks["metrics"] = StationMetrics(f"{metrics_addr[0]}:{metrics_addr[1]}")
            opened["metrics"] = sinks["metrics"].close
            sinks["metrics"].set_models(models.serving.version, models.trial.version if models.trial else None)
        station = Station(models, db_path, config=config, station_id=station_id, batch=batch, note=_note, **sinks)
        if mqtt_addr:
            from edgekit.station.mqtt import MqttPublisher

            station.publisher = MqttPublisher(db_path, mqtt_addr[0], mqtt_addr[1], topic, station_id, station.status)
        http_input = None
        if http_addr:  # bound before anything is written: a port in use is one error line and no database
            from edgekit.station.inputs import HttpInput

            http_input = HttpInput(f"{http_addr[0]}:{http_addr[1]}", station.submit, station.status).start()
            opened["http"] = http_input.stop
        # one station per database: a second one (systemd's and a hand-started one) would count every canary image
        # twice and race the first for the verdict. A lock on the database file's neighbour, held until we exit.
        opened["lock"] = _lock_station(db_path)
        if review:  # made only now (it creates DIR/inbox): a port in use above leaves no folder behind
            from edgekit.mlff.drift import ReviewFolder

            station.review = ReviewFolder(review)
        if policy is not None:  # recorded once every refusal (a config, a port in use) is behind us
            InstallRoot(root_path).set_canary_policy(policy)
        station.start()
        opened["station"] = station.stop
        if station.publisher is not None:
            station.publisher.start()
            opened["mqtt"] = station.publisher.stop
        if watch:
            from edgekit.station.inputs import WatchInput

            watch_input = WatchInput(watch, station.submit, station.seen).start()
            opened["watch"] = watch_input.stop
        where = ", ".join(filter(None, [f"watching {watch}" if watch else None,
                                        f"http://{http_input.address}/infer" if http_input else None,
                                        f"metrics at {sinks['metrics'].url}" if metrics_addr else None]))
        _note(f"station {station_id}: serving {models.serving.version}"
              + (f", trial {models.trial.version} in shadow" if models.trial else "") + f"; {where}; results in "
              f"{db_path}; stop with SIGTERM or Ctrl-C")
        while not stop.wait(0.2) and station.running:
            pass
    finally:
        for name in order:
            if name not in opened:
                continue
            try:
                opened[name]()
            except Exception:  # noqa: BLE001 - closing must not hide the reason we stop
                pass
        models.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if station.failure is not None:
        raise EdgekitError(f"the station stopped: {station.failure}")
    c = station.status()["counts"]
    click.echo(f"stopped: {c['images']} images ({c['ok']} OK, {c['ng']} NG, {c['error']} errors) in {db_path}")


@station_group.command("status")
@click.argument("root", type=click.Path(), metavar="ROOT")
@click.option("--db", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=f"The station's SQLite results (default ROOT/{DB_NAME}).")
@json_option
def status_cmd(root, db, as_json):
    """Versions (serving, trial, blocked), the canary policy and verdicts, counts, drift rate, last errors."""
    from edgekit.station.status import read_status

    s = read_status(root, db)
    if as_json:
        echo_json(s)
        return
    c = s["counts"] or {}
    click.echo(f"serving {s['serving'] or '-'}; trial {s['trial'] or '-'}"
               + (f" (on canary hold since {s['trial_held']})" if s.get("trial_held") else ""))
    pol = s["canary_policy"]
    click.echo("canary: " + (f"{pol['images']} live images, agreement >= {pol['min_agreement']}" if pol else "none")
               + (f"; last verdict: {s['last_verdict']['reason']}" if s.get("last_verdict") else ""))
    if s["blocked"]:
        click.echo("blocked: " + "; ".join(f"{v} ({why})" for v, why in s["blocked"].items()))
    if c:
        rate = (f", drift rate {s['drift_rate']:.3f} (newest {s['drift_scored']} scored)" if s.get("drift_rate")
                is not None else ", drift not scored")
        click.echo(f"results: {c.get('images', 0)} images ({c.get('ok', 0)} OK, {c.get('ng', 0)} NG, "
                   f"{c.get('error', 0)} errors){rate}; last {c.get('last') or '-'}")
    else:
        click.echo(f"results: no database at {s['db']}")
    for e in s["last_errors"]:
        click.echo(f"error at {e.get('time')}: {e.get('error')}")


@station_group.command("promote")
@click.argument("root", type=click.Path(), metavar="ROOT")
@json_option
def promote_cmd(root, as_json):
    """Commit the trial on canary hold now (the operator's override of the station's canary)."""
    from edgekit.station.canary import promote

    r = promote(root)
    if as_json:
        echo_json(r)
        return
    click.echo(f"promoted {r['version']}: it is in service")


@station_group.command("reject")
@click.argument("root", type=click.Path(), metavar="ROOT")
@click.option("--reason", default=None, help="Why (recorded with the block).")
@json_option
def reject_cmd(root, reason, as_json):
    """Discard the trial on canary hold and block its version (edgekit update --allow VERSION lifts the block)."""
    from edgekit.station.canary import reject

    if reason is not None:
        # the reason is printed inside later one-line errors (edgekit update's "blocked (...)"): a newline in it
        # would make them two lines, the second one free text that reads like an error of its own
        reason = " ".join(reason.split())
        if not reason:
            raise EdgekitError("--reason is empty; give the reason in words or leave --reason out")
    r = reject(root, reason)
    if as_json:
        echo_json(r)
        return
    click.echo(f"rejected {r['version']}: blocked ({r['reason']}); {r['serving']} stays in service")


commands = [station_group]
