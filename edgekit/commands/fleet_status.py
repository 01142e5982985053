"""``edgekit fleet status --mqtt HOST:PORT``: every station's retained status from the plant's MQTT broker."""
from __future__ import annotations

import click

from edgekit.commands._common import echo_json, json_option, note, print_table

# paho-mqtt comes with edgekit[station]: without it the command is listed as needing it and fails with the pip line
EXTRA = "station"
REQUIRES = ("paho",)


@click.group("fleet")
def fleet_group():
    """The fleet seen from one place (the stations' retained status on the plant's MQTT broker)."""


@fleet_group.command("status")
@click.option("--mqtt", "mqtt_addr", required=True, metavar="HOST:PORT",
              help="The MQTT broker the stations publish to.")
@click.option("--topic", default="edgekit", show_default=True,
              help="The topic prefix the stations share (edgekit station --topic).")
@click.option("--wait", "wait_s", type=click.FloatRange(0.1, 120), default=2.0, show_default=True,
              help="Seconds to collect the retained statuses, at most (it returns once the broker's burst is over).")
@json_option
def status_cmd(mqtt_addr, topic, wait_s, as_json):
    """List every station's state, serving and trial versions, canary, counts and drift rate."""
    from edgekit.station.mqtt import parse_host_port, read_fleet_status

    host, port = parse_host_port(mqtt_addr, "--mqtt")
    stations = read_fleet_status(host, port, topic, wait_s)
    if as_json:
        echo_json({"broker": f"{host}:{port}", "topic": topic, "stations": stations})
        return
    if not stations:
        note(f"no station status under {topic}/status/+ at {host}:{port}")
        return
    print_table(f"stations on {host}:{port} ({topic})",
                ["station", "state", "serving", "trial", "canary", "images", "NG", "drift", "updated"],
                [row(s) for s in stations], numeric=False)


def _version(value) -> str:
    if isinstance(value, dict):
        return str(value.get("version") or "-")
    return str(value) if value else "-"


def _canary(value) -> str:
    if not value:
        return "-"
    if not isinstance(value, dict):
        return str(value)
    parts = [str(value.get("verdict") or value.get("state") or value.get("phase") or "")]
    if value.get("needed") is not None:  # the station's canary: images run so far / images it needs
        parts.append(f"{value.get('images', '?')}/{value['needed']}")
    elif value.get("seen") is not None:
        parts.append(f"{value['seen']}/{value.get('images', '?')}")
    if isinstance(value.get("agreement"), (int, float)):
        parts.append(f"agree {value['agreement']:.2f}")
    return " ".join(p for p in parts if p) or "-"


def _ratio(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def row(status: dict) -> list:
    """One table row from a station's status (tolerant: a field a station does not report shows as -)."""
    counts = status.get("counts") if isinstance(status.get("counts"), dict) else {}
    images = counts.get("images")
    ng = counts.get("ng")
    drift = status.get("drift")  # {"rate": ...}, a number, or a word ("unavailable") beside "drift_rate"
    drift_rate = drift.get("rate") if isinstance(drift, dict) else drift if isinstance(drift, (int, float)) else \
        status.get("drift_rate")
    state = str(status.get("state") or "-")
    if status.get("reason") and state != "online":
        state += f" ({status['reason']})"
    return [status.get("station", "?"), state, _version(status.get("serving")), _version(status.get("trial")),
            _canary(status.get("canary")), images if images is not None else "-",
            _ratio(ng / images) if isinstance(ng, int) and images else "-", _ratio(drift_rate),
            status.get("time") or "-"]


commands = [fleet_group]
