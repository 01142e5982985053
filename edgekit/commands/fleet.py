"""Fleet commands on The Update Framework: ``edgekit repo init|add|delegate|publish|rotate|status`` (build
machine) and ``edgekit update`` (device)."""
from __future__ import annotations

import click

from edgekit.commands._common import echo_json, json_option, print_table

# The optional extra these commands need: when a package is missing, edgekit.cli lists them as
# needing it and each call fails with the pip line (the TUF modules load inside the commands).
EXTRA = "ota"
REQUIRES = ("tuf", "securesystemslib")

SIGN_WITH = click.option("--sign-with", "sign_with", multiple=True, type=click.Path(),
                         help="A private key (keygen folder or PEM) not at its recorded place, e.g. an offline "
                              "root key; repeat.")


def _note(text: str) -> None:
    click.echo(text, err=True)


@click.group("repo")
def repo_group():
    """An adapter repository (TUF metadata + packages) to serve to a fleet as static files."""


@repo_group.command("init")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--keys", "keydir", required=True, type=click.Path(file_okay=False),
              help="Key folder: created with new keys when missing, else root-1..N, targets, snapshot, timestamp.")
@click.option("--root-keys", type=click.IntRange(1, 16), default=3, show_default=True, help="Number of root keys.")
@click.option("--root-threshold", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Root signatures needed for a root change.")
@click.option("--expires", default=None, help="Expiry per role, e.g. root=365d,targets=90d,snapshot=7d,timestamp=1d.")
@click.option("--package-key", "package_keys", multiple=True, type=click.Path(),
              help="Public key that adapter packages are signed with (edgekit keygen); repeat.")
@click.option("--tasks", "tasks", default="*", show_default=True,
              help="Tasks the --package-key keys may sign: comma-separated patterns, e.g. 'crack-*,scratch-*'.")
@click.option("--backbones", "backbones", default="",
              help="Backbone names the --package-key keys may sign (backbone packages), e.g. 'efficientnet-lite0'.")
@json_option
def init_cmd(folder, keydir, root_keys, root_threshold, expires, package_keys, tasks, backbones, as_json):
    """Create a TUF repository (root, targets, snapshot, timestamp; consistent snapshots)."""
    from edgekit.fleet.repository import init_repository

    r = init_repository(folder, keydir, root_keys, root_threshold, expires, package_keys, _patterns(tasks),
                        _patterns(backbones))
    if as_json:
        echo_json(r)
        return
    click.echo(f"created repository {r['repository']}: serve its metadata/ and targets/ folders as static files")
    click.echo(f"provision devices with a trust bundle: edgekit repo provision {r['repository']} --out BUNDLE "
               "(then edgekit update --trust BUNDLE)")
    click.echo(f"OFFLINE root keys ({r['root_threshold']} of {len(r['root_keys'])} sign a root change): move these "
               "files off the build machine, each to its own safe place:")
    for p in r["root_keys"]:
        click.echo(f"  {p}")
    click.echo("online keys (stay on the build machine): " + ", ".join(f"{k} {v}" for k, v in r["online_keys"].items()))


@repo_group.command("add")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.argument("packages", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="PACKAGE...")
@click.option("--role", default=None, help="Role that signs them (default: the delegated role whose paths match, "
                                            "else targets).")
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(),
              help="Trust this package signing public key (kept for later adds); repeat.")
@SIGN_WITH
@json_option
def add_cmd(folder, packages, role, pubkeys, sign_with, as_json):
    """Add signed adapter packages as targets (then: edgekit repo publish DIR)."""
    from edgekit.fleet.repository import add_packages

    rows = add_packages(folder, packages, role, pubkeys, sign_with)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"added {r['package']} as {r['target']} ({r['length']:,} bytes), {r['role']} version "
                   f"{r['role_version']}")
    _note(f"note: devices see it after edgekit repo publish {folder}")


def _patterns(text: str):
    return [p.strip() for p in (text or "").split(",") if p.strip()]


@repo_group.command("package-key")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.argument("key", metavar="KEY")
@click.option("--tasks", "tasks", default="", help="Tasks this key may sign: comma-separated patterns ('crack-*').")
@click.option("--backbones", "backbones", default="", help="Backbone names this key may sign (backbone packages).")
@click.option("--remove", is_flag=True, help="Stop trusting KEY (a key file or key id).")
@json_option
def package_key_cmd(folder, key, tasks, backbones, remove, as_json):
    """Trust a package-signing key for some tasks/backbones (replacing its scope), or --remove it.

    Devices follow only when re-provisioned (edgekit repo provision): the repository cannot widen what a
    device trusts."""
    from edgekit.fleet.repository import package_key

    r = package_key(folder, key, _patterns(tasks), _patterns(backbones), remove)
    if as_json:
        echo_json(r)
        return
    if r.get("removed"):
        click.echo(f"package key {r['key_id'][:16]}… is no longer trusted by {folder}")
    else:
        click.echo(f"package key {r['key_id'][:16]}… may sign tasks {', '.join(r['tasks']) or '-'}; backbones "
                   f"{', '.join(r['backbones']) or '-'}")
    _note("note: devices follow after edgekit repo provision and a new --trust bundle on each device")


@repo_group.command("provision")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Trust bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@json_option
def provision_cmd(folder, out, force, as_json):
    """Write a device trust bundle: the newest root, timestamp and snapshot, and the package keys with their
    scopes (give it to edgekit update --trust on each device)."""
    from edgekit.fleet.repository import provision

    r = provision(folder, out, force)
    if as_json:
        echo_json(r)
        return
    click.echo(f"wrote trust bundle {r['bundle']} (root v{r['root_version']}, timestamp v{r['timestamp_version']}, "
               f"snapshot v{r['snapshot_version']}, {len(r['package_keys'])} package key(s)); install it on each "
               "device and give it to edgekit update --trust")


@repo_group.command("delegate")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.argument("name")
@click.option("--paths", "paths", multiple=True, required=True,
              help="Target path pattern the role may publish, e.g. 'adapters/crack-*'; repeat.")
@click.option("--key", "key", required=True, type=click.Path(), help="The role's key (keygen folder or PEM).")
@SIGN_WITH
@json_option
def delegate_cmd(folder, name, paths, key, sign_with, as_json):
    """Delegate target paths to a new role with its own key (one product line or task)."""
    from edgekit.fleet.repository import delegate

    r = delegate(folder, name, paths, key, sign_with)
    if as_json:
        echo_json(r)
        return
    click.echo(f"delegated {', '.join(r['paths'])} to role {r['role']} (key {r['keyid'][:16]}…); "
               f"targets version {r['targets_version']}")
    _note(f"note: devices see it after edgekit repo publish {folder}")


@repo_group.command("publish")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--timestamp-expires", default=None, help="Expiry of this timestamp (30s, 10m, 1d, ...).")
@SIGN_WITH
@json_option
def publish_cmd(folder, timestamp_expires, sign_with, as_json):
    """Write a new snapshot (if targets changed) and a new timestamp: what devices see next."""
    from edgekit.fleet.repository import publish

    r = publish(folder, timestamp_expires, sign_with)
    if as_json:
        echo_json(r)
        return
    click.echo(f"published snapshot {r['snapshot_version']}{' (new)' if r['snapshot_new'] else ''}, timestamp "
               f"{r['timestamp_version']} (expires {r['timestamp_expires']})")


@repo_group.command("rotate")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--role", required=True, help="root, targets, snapshot, timestamp or a delegated role.")
@click.option("--add-key", "add_keys", multiple=True, type=click.Path(), help="Key to add (keygen folder or PEM).")
@click.option("--remove-key", "remove_keys", multiple=True, help="Key to revoke: key file/folder or key id.")
@SIGN_WITH
@json_option
def rotate_cmd(folder, role, add_keys, remove_keys, sign_with, as_json):
    """Rotate or revoke a role's keys (root changes: signed by the old and the new root threshold)."""
    from edgekit.fleet.repository import rotate

    r = rotate(folder, role, add_keys, remove_keys, sign_with)
    if as_json:
        echo_json(r)
        return
    click.echo(f"{role}: added {len(r['added'])} key(s), revoked {len(r['removed'])}; wrote {', '.join(r['written'])}")
    _note(f"note: devices see it after edgekit repo publish {folder}")


@repo_group.command("status")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@json_option
def status_cmd(folder, as_json):
    """Roles, keys, versions, expiry and adapters of a repository."""
    from edgekit.fleet.repository import status

    s = status(folder)
    if as_json:
        echo_json(s)
        return
    rows = []
    for r in s["roles"]:
        keys = ", ".join(k["keyid"][:12] + ("" if k["private_key_present"] else " (offline)") for k in r["keys"])
        rows.append((r["role"], r["version"], r["expires"] + (" EXPIRED" if r["expired"] else ""),
                     f"{r['threshold']} of {len(r['keys'])}", keys, ", ".join(r.get("paths", [])) or "-"))
    print_table(f"repository {s['repository']}", ["role", "version", "expires", "threshold", "keys", "paths"], rows,
                numeric=False)
    arows = [(a["target"], a["role"], a["task"] or "-", a["version"], a["backbone"], f"{a['length']:,}")
             for a in s["adapters"]]
    print_table("targets", ["target", "role", "task", "version", "backbone", "bytes"], arows, numeric=False)
    krows = [(k["key_id"][:16] + "…", ", ".join(k["tasks"]) or "-", ", ".join(k["backbones"]) or "-")
             for k in s["package_keys"]]
    print_table("package keys (devices trust them through their provisioned bundle)", ["key", "tasks", "backbones"],
                krows, numeric=False)


@click.command("update")
@click.option("--repo", "repo_url", required=True, help="URL of the repository folder (serving metadata/, targets/).")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Install root on the device.")
@click.option("--trust", required=True, type=click.Path(),
              help="The device's trust bundle (folder from edgekit repo provision: root metadata and the package "
                   "keys trusted per task).")
@click.option("--backbone", default=None, metavar="ARTIFACT|CKPT|NAME|repo:NAME",
              help="The deployed backbone (default: the one recorded in ROOT/backbone.json); repo:NAME fetches "
                   "backbone NAME from the repository (TUF + the trust bundle's backbone keys) into ROOT/backbones/.")
@click.option("--task", default=None, help="The device's task (default: the installed adapter's).")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds without data before a request is given up.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Seconds for all the downloads of this run, however slowly data arrives.")
@click.option("--file-deadline", type=click.FloatRange(min=0, min_open=True), default=120, show_default=True,
              help="Seconds for one file (metadata or package), headers and body.")
@click.option("--allow", "allow", default=None, metavar="VERSION",
              help="Unblock VERSION (it failed its health check or was rolled back) so this run may install it.")
@click.option("--pin", "pin", default=None, metavar="VERSION", help="Hold the device at VERSION: install nothing else.")
@click.option("--unpin", is_flag=True, help="Release a --pin.")
@click.option("--no-health-check", is_flag=True, help="Skip the health check (not recommended).")
@json_option
def update_cmd(repo_url, root, trust, backbone, task, timeout, deadline, file_deadline, allow, pin, unpin,
               no_health_check, as_json):
    """Fetch, verify (TUF + package), try and health-check the newest adapter, commit it only if it passes.

    Exit 0: installed or up to date; 3: the newest version is blocked on this device (it failed its check or
    was rolled back; --allow VERSION to try it again); 2: refused (one error line)."""
    from edgekit.fleet.update import update

    r = update(repo_url, root, trust, backbone, task, timeout, health=not no_health_check, deadline=deadline,
               file_deadline=file_deadline, allow=allow, pin=pin, unpin=unpin)
    rec = r.get("recovered")
    if rec:
        _note(f"note: discarded the trial of {rec['version']} left by an interrupted run ({rec['reason']})"
              + ("; it is now blocked" if rec["blocked"] else "; it is tried once more"))
    if as_json:
        echo_json(r)
        return
    if r["action"] == "none":
        click.echo(f"{'nothing installed' if r.get('trial') else 'up to date'}: {r['reason']}")
        return
    h = r.get("health")
    checked = (f"; health check passed on {h['images']} images (max abs diff {h['max_abs_diff']:.3g})" if h else
               "; no health check (the package carries no samples)")
    if r["action"] == "trial":
        click.echo(f"on trial: {r['task']} {r['version']}{checked}; {r['reason']}")
        return
    click.echo(f"installed {r['task']} {r['version']}" + (f" (was {r['previous']})" if r["previous"] else "") + checked)


commands = [repo_group, update_cmd]
