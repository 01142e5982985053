"""OTA adapter commands: keygen, package, verify, install, rollback."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.commands._common import echo_json, force_option, json_option, out_option, print_table

# The optional extra these commands need: when a package is missing, edgekit.cli lists them as
# needing it and each call fails with the pip line. The edgekit.ota modules load inside the commands.
EXTRA = "ota"
REQUIRES = ("safetensors",)  # a runtime dependency now, as cryptography; the gate stays for installs without it

MAX_SIZE_HELP = "Refuse packages larger than this, packed or unpacked (bytes; default 16 MiB)."


def _short(key_id: str) -> str:
    return key_id[:16] + "…"


@click.command("keygen")
@out_option("folder", "Folder for the key pair.", dest="out_dir")
@force_option
def keygen_cmd(out_dir, force):
    """Create an Ed25519 key pair for signing adapter packages."""
    from edgekit.ota.keys import generate_keypair

    private_path, public_path, kid = generate_keypair(out_dir, force=force)
    click.echo(f"wrote {private_path} (private, mode 0600: keep it on the build machine)")
    click.echo(f"wrote {public_path} (public: give it to devices with --pubkey)")
    # Two ids name the same key, and both appear in output: edgekit's own (the sha256 of the raw public
    # key: manifest.sig, sealed packages, trust bundles, `repo status` package keys) and TUF's (the
    # hash of the key's TUF metadata form, securesystemslib's keyid: `repo status` roles, `repo delegate`).
    click.echo(f"key id {kid} (edgekit: sha256 of the raw public key; package and artifact signatures, "
               "trust bundles, 'package keys' in repo status)")
    tuf_id = _tuf_key_id(public_path)
    if tuf_id is not None:
        click.echo(f"TUF key id {tuf_id} (as a repository role key: 'roles' in repo status, repo delegate)")


def _tuf_key_id(public_path):
    """The TUF keyid of a public key file, or None where the fleet packages (tuf) are not installed."""
    try:
        from edgekit.fleet.repository import public_key
    except ImportError:
        return None
    return public_key(public_path).keyid


@click.command("package")
@click.argument("adapter", type=click.Path(file_okay=False), metavar="ADAPTER_DIR|BACKBONE_ARTIFACT")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Private key PEM.")
@click.option("--version", "version", required=True, help="Package version, MAJOR.MINOR.PATCH (e.g. 1.2.3).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Package file to write.")
@click.option("--samples", "samples", multiple=True, type=click.Path(exists=True),
              help="Sample images (files or a folder) for the device's health check; repeat. MLFF adapters only.")
@click.option("--backbone", "backbone_ref", default=None, metavar="CKPT|NAME",
              help="Backbone the samples run on (default: the backbone of the adapter's registry).")
@click.option("--max-samples", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Sample images kept, evenly spread over the given ones in name order.")
def package_cmd(adapter, key_path, version, out_path, samples, backbone_ref, max_samples):
    """Sign an adapter folder (or a compiled MLFF backbone artifact) into one OTA package (sealed zip)."""
    from edgekit.artifact import is_artifact
    from edgekit.ota.package import DEFAULT_MAX_SIZE, build_backbone_package, build_package

    if is_artifact(Path(adapter)):
        if samples:
            from edgekit.errors import EdgekitError

            raise EdgekitError("--samples is for adapter packages; a backbone package carries its artifact only")
        manifest = build_backbone_package(adapter, key_path, version, out_path)
        size = Path(out_path).stat().st_size
        click.echo(f"wrote {out_path} ({size:,} bytes): backbone {manifest['backbone']} {manifest['version']} "
                   f"({manifest['target']} {manifest['precision']}), {len(manifest['files'])} files, signed by key "
                   f"{_short(manifest['key_id'])}")
        return
    health = info = None
    if samples:
        from edgekit.data.images import expand_image_paths
        from edgekit.fleet.health import record_health
        from edgekit.models.backbones import load_backbone

        found = sorted(expand_image_paths(list(samples), recursive=True))
        n = min(max_samples, len(found))
        images = [found[i * len(found) // n] for i in range(n)]  # spread over the folder (and its classes)
        health, info = record_health(adapter, load_backbone(backbone_ref or _registry_backbone(adapter)), images)
    manifest = build_package(adapter, key_path, version, out_path, health=health, health_info=info)
    size = Path(out_path).stat().st_size
    click.echo(f"wrote {out_path} ({size:,} bytes): {manifest['task']} {manifest['version']}, "
               f"{len(manifest['files'])} payload files, signed by key {_short(manifest['key_id'])}"
               + (f", {info['images']} health samples" if info else ""))
    if size > DEFAULT_MAX_SIZE:
        click.echo(f"note: larger than the default install limit of {DEFAULT_MAX_SIZE:,} bytes; "
                   "devices need --max-size", err=True)


def _registry_backbone(adapter_dir) -> str:
    """The backbone ref of the registry an adapter folder sits in (REGISTRY/adapters/NN-task)."""
    from edgekit.errors import EdgekitError
    from edgekit.mlff.registry import REGISTRY_NAME, Registry

    registry = Path(adapter_dir).resolve().parent.parent
    if not (registry / REGISTRY_NAME).is_file():
        raise EdgekitError(f"{adapter_dir} is not inside an adapter registry; give --backbone for the samples")
    return Registry.open(registry).meta["backbone_ref"]


@click.command("verify")
@click.argument("package", type=click.Path(dir_okay=False), metavar="FILE")
@click.option("--pubkey", "pubkeys", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Trusted public key PEM; repeat for a set of trusted keys.")
@click.option("--max-size", type=click.IntRange(min=1), default=None, help=MAX_SIZE_HELP)
@json_option
def verify_cmd(package, pubkeys, max_size, as_json):
    """Check a package's signature, signer, payload hashes and members; nothing is written."""
    from edgekit.ota.package import DEFAULT_MAX_SIZE, verify_package

    summary = verify_package(package, pubkeys, max_size or DEFAULT_MAX_SIZE, kind=None).summary()
    if as_json:
        echo_json(summary)
        return
    if summary.get("kind") == "backbone":
        rows = [("backbone", f"{summary['backbone']} (sha256 {summary['backbone_sha256'][:16]}…)"),
                ("version", summary["version"]), ("artifact", f"{summary['target']} {summary['precision']}"),
                ("created (UTC)", summary["created_utc"]),
                ("signed by", f"key {_short(summary['key_id'])} ({summary['key_file']})"),
                ("payload", ", ".join(f"{f['name']} ({f['size']:,} B)" for f in summary["files"])),
                ("archive", f"{summary['archive_size']:,} bytes")]
        print_table(f"verified: {summary['package']}", ["field", "value"], rows)
        return
    rows = [
        ("task", summary["task"]),
        ("version", summary["version"]),
        ("classes", ", ".join(summary["classes"])),
        ("backbone", f"{summary['backbone']} (sha256 {summary['backbone_sha256'][:16]}…)"),
        ("input", ", ".join(f"{k}={v}" for k, v in summary["input"].items()) or "-"),
        ("created (UTC)", summary["created_utc"]),
        ("signed by", f"key {_short(summary['key_id'])} ({summary['key_file']})"),
        ("payload", ", ".join(f"{f['name']} ({f['size']:,} B)" for f in summary["files"])),
        ("archive", f"{summary['archive_size']:,} bytes"),
    ]
    print_table(f"verified: {summary['package']}", ["field", "value"], rows)


@click.command("install")
@click.argument("package", type=click.Path(dir_okay=False), metavar="FILE")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Install root on the device.")
@click.option("--pubkey", "pubkeys", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Trusted public key PEM; repeat for a set of trusted keys.")
@click.option("--backbone-sha256", default=None,
              help="backbone_sha256 of the device's backbone: the sha256 of its weights file, which a compiled "
                   "artifact records as model.backbone_sha256 (default: ROOT/backbone.json or ROOT/backbone.sha256).")
@click.option("--backbone", "backbone_ref", default=None, metavar="ARTIFACT|CKPT|NAME",
              help="The device's backbone (compiled artifact folder, weights file or name): its backbone_sha256 is "
                   "checked instead of --backbone-sha256.")
@click.option("--allow-downgrade", is_flag=True, help="Also install a version older than or equal to the current.")
@click.option("--max-size", type=click.IntRange(min=1), default=None, help=MAX_SIZE_HELP)
@json_option
def install_cmd(package, root, pubkeys, backbone_sha256, backbone_ref, allow_downgrade, max_size, as_json):
    """Verify a package and put it in service atomically; the replaced version is kept for rollback."""
    from edgekit.errors import EdgekitError
    from edgekit.ota.install import BACKBONE_FILE, install_package
    from edgekit.ota.package import DEFAULT_MAX_SIZE

    if backbone_ref is not None:
        from edgekit.fleet.backbone import resolve_backbone

        if backbone_sha256 is not None:
            raise EdgekitError("give --backbone or --backbone-sha256, not both")
        backbone_sha256 = resolve_backbone(backbone_ref).sha256

    result = install_package(package, root, pubkeys, backbone_sha256=backbone_sha256,
                             allow_downgrade=allow_downgrade, max_size=max_size or DEFAULT_MAX_SIZE)
    if as_json:
        echo_json(result)
        return
    kept = f"; {result['previous']} kept for rollback" if result["previous"] else ""
    click.echo(f"installed {result['task']} {result['installed']} at {result['path']}{kept}")
    if not result["backbone_checked"]:
        click.echo(f"note: backbone not checked (no --backbone-sha256 and no {Path(root) / BACKBONE_FILE})")


@click.command("rollback")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Install root on the device.")
@json_option
def rollback_cmd(root, as_json):
    """Put the previous version back in service (running it again returns to the one rolled back from).

    The version rolled back from is blocked: edgekit update does not install it again until --allow VERSION."""
    from edgekit.ota.install import rollback

    result = rollback(root)
    if as_json:
        echo_json(result)
        return
    click.echo(f"rolled back to {result['version']} (from {result['from']}) at {result['path']}")
    click.echo(f"note: {result['blocked']} is blocked for edgekit update (edgekit update --allow {result['blocked']} "
               "lifts it)", err=True)


commands = [keygen_cmd, package_cmd, verify_cmd, install_cmd, rollback_cmd]
