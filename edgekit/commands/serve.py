"""Serving commands: export-repo (Triton / OVMS model repositories), serve (the bundled tritonserver)."""
from __future__ import annotations

from pathlib import Path

import click

from edgekit.commands._common import echo_json, force_option, json_option, threads_option

EXTRA = "serve"  # tritonclient: Triton's config protobuf and the Open Inference Protocol client
REQUIRES = ("tritonclient",)


@click.command("export-repo")
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("--format", "fmt", required=True, type=click.Choice(["triton", "ovms"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Repository folder to write.")
@click.option("--name", default=None, help="Model name (one artifact only; default: the artifact folder's name).")
@click.option("--version", "version", default=None, type=click.IntRange(1),
              help="Version folder number (default 1, or the next free one with --add).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="max_batch_size (lowered to what the artifact runs).")
@click.option("--instances", default=2, show_default=True, type=click.IntRange(1),
              help="Triton instance_group count; OVMS: NUM_STREAMS.")
@click.option("--dynamic-batching", is_flag=True, help="Triton: server-side batching of concurrent requests.")
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(0),
              help="Dynamic batching: how long a request may wait for others.")
@click.option("--triton-backend", default="auto", show_default=True, type=click.Choice(["auto", "native", "python"]),
              help="auto: Triton's own backend for the target where it has one, else python (edgekit.runtime).")
@click.option("--accelerator", default="none", show_default=True, type=click.Choice(["none", "openvino", "tensorrt"]),
              help="ONNX artifacts on Triton's onnxruntime backend: OpenVINO (CPU) or TensorRT (GPU) execution provider.")
@click.option("--no-warmup", is_flag=True, help="Triton: no model_warmup section.")
@force_option
@click.option("--add", is_flag=True, help="Add models / new versions to an existing repository.")
@json_option
def export_repo_cmd(artifacts, fmt, out, name, version, max_batch, instances, dynamic_batching, queue_delay_us,
                    triton_backend, accelerator, no_warmup, force, add, as_json):
    """A Triton Inference Server or OpenVINO Model Server model repository from edgekit artifacts."""
    from edgekit.serve.repository import ServeOptions, export_repo

    opts = ServeOptions(max_batch=max_batch, instances=instances, dynamic_batching=dynamic_batching,
                        max_queue_delay_us=queue_delay_us, triton_backend=triton_backend, accelerator=accelerator,
                        warmup=not no_warmup)
    summary = export_repo(artifacts, fmt, out, name=name, version=version, opts=opts, force=force, add=add)
    if as_json:
        echo_json(summary)
        return
    for m in summary["models"]:
        for note in m["notes"]:
            click.echo(f"note: {m['name']}: {note}", err=True)
        click.echo(f"{summary['repository']}: {m['name']} version {m['version']} ({m['target']}:{m['precision']} "
                   f"via {m['route']}, max batch {m['max_batch_size']})")


@click.command("serve")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--http", default="127.0.0.1:8000", show_default=True,
              help="HTTP (KServe v2 REST) address. Loopback by default: the server has no TLS and no authentication "
                   "of its own; to serve other machines put a TLS/mTLS reverse proxy in front (README: Serving).")
@click.option("--grpc", default="127.0.0.1:8001", show_default=True, help="gRPC address ('off': none); loopback by "
              "default, like --http.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), metavar="PUBLIC_KEY",
              help="Serve only artifacts signed by this key (edgekit keygen's public_key.pem; repeat for several). "
                   "Default: the keys in EDGEKIT_TRUSTED_KEYS, else the hashes only.")
@threads_option()  # per model instance
@click.option("--install", is_flag=True, help="Install the bundled tritonserver first if it is not there "
              "(nvidia-pytriton, no dependencies, into edgekit's cache).")
@click.option("--poll", "poll_secs", default=None, type=click.IntRange(1), metavar="SECONDS",
              help="Re-read the repository every SECONDS: new versions (export-repo --add) load without a restart.")
@click.option("--log", "log_file", default=None, type=click.Path(dir_okay=False), help="tritonserver's log file.")
def serve_cmd(repo, http, grpc, trusted_keys, threads, install, poll_secs, log_file):
    """Serve a Triton model repository (python-backend models) with the tritonserver of nvidia-pytriton.

    Runs until interrupted (Ctrl-C / SIGTERM), then stops the server.
    """
    import signal
    import time

    from edgekit.serve.triton import TritonServer, find_triton, install_triton

    from edgekit.serve.triton import check_repository, parse_address

    parse_address(http, "--http")  # a bad address is refused before the repository's files are read
    if grpc != "off":
        parse_address(grpc, "--grpc")
    check_repository(Path(repo), list(trusted_keys) or None)  # every file of every model, before anything starts
    dist = install_triton(log=lambda m: click.echo(m, err=True)) if install else find_triton()
    server = TritonServer(repo, http=http, grpc=None if grpc == "off" else grpc, dist=dist, log_file=log_file,
                          threads=threads, poll_secs=poll_secs, trusted_keys=list(trusted_keys) or None)
    def on_term(*_):  # SIGTERM stops the server like Ctrl-C (a background job may ignore SIGINT)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.start()  # inside the try: Ctrl-C / SIGTERM while it starts stops tritonserver too (it was orphaned)
        click.echo(f"serving {', '.join(server.models)} from {server.repo}: http://{server.http_url}"
                   + (f", grpc://{server.grpc_url}" if server.grpc_url else "") + f" (log: {server.log_file})",
                   err=True)
        while server.proc.poll() is None:
            time.sleep(1)
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"tritonserver exited ({server.proc.returncode}): {server.failure_line()}")
    except KeyboardInterrupt:
        click.echo("stopping tritonserver", err=True)
    finally:
        server.stop()


commands = [export_repo_cmd, serve_cmd]
