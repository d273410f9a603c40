"""`fedtune deploy compose`: Docker Compose files for one SuperLink and N SuperNodes.

Why generated: every SuperNode needs its own partition-id, port, ClientApp SuperExec, warm
worker and socket volume, and the TLS overlay must repeat each SuperNode's whole command
(an overlay's `command` replaces the base's), so a third client meant copying six services
by hand. deploy/compose.yml and deploy/compose.tls.yml are this module's output for 2
SuperNodes (tests/test_deploy_files.py checks that they are current).

Two networks: `bridge` (compose's own network, services reach each other by name; the
default) and `host` (every container on the host's network, each server on its own port of
127.0.0.1 or of the address given: one machine playing several, or a Docker engine without a
bridge, like `dockerd --bridge=none`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FLWR_VERSION = "1.41.0"  # = the flwr pinned in pyproject.toml (test_deploy_files checks it)
SOCKET = "/run/fedtune/worker.sock"  # worker-N's socket, in the volume clientapp-N shares


@dataclass(frozen=True)
class Layout:
    """What the files describe; `fedtune deploy compose` fills it from its arguments."""

    clients: int
    network: Literal["bridge", "host"] = "bridge"
    port: int = 9093  # host network: SuperLink on `port`, SuperNode i's Runtime API on port + i
    gpus: bool = False  # each clientapp and worker asks for the host's NVIDIA GPUs
    mounts: tuple[str, ...] = field(default_factory=tuple)  # HOST:CONTAINER[:ro], every app
    tls: bool = False  # also the TLS + SuperNode authentication overlay
    data_path: str = ""  # each client trains on its own file/folder (inside /data), no shard

    @property
    def host(self) -> bool:
        return self.network == "host"

    def link(self) -> tuple[str, str]:
        """(address SuperNodes dial, address the ServerApp's SuperExec dials)."""
        if self.host:
            return f"${{SUPERLINK_ADDRESS:-127.0.0.1:{self.port}}}", f"127.0.0.1:{self.port}"
        return "${SUPERLINK_ADDRESS:-superlink:8000}", "superlink:8000"

    def node_port(self, i: int) -> int:
        return (self.port if self.host else 9093) + i

    def node_api(self, i: int) -> str:
        return f"{'127.0.0.1' if self.host else f'supernode-{i}'}:{self.node_port(i)}"


def write(layout: Layout, folder: Path) -> list[Path]:
    """compose.yml and compose.tls.yml for `layout` in `folder`; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [("compose.yml", base(layout))] + (
        [("compose.tls.yml", tls(layout))] if layout.tls else []
    )
    for name, text in files:
        (folder / name).write_text(text)
    return [folder / name for name, _ in files]


def _list(items: list[str], indent: int, notes: dict[int, str] | None = None) -> list[str]:
    """A YAML block list of strings, each quoted only where YAML needs it, with optional
    end-of-line comments by position."""
    pad, notes = " " * indent, notes or {}
    lines = []
    for k, item in enumerate(items):
        text = item if _plain(item) else '"' + item.replace('"', '\\"') + '"'
        lines.append(f"{pad}- {text}" + (f"  # {notes[k]}" if k in notes else ""))
    return lines


def _plain(item: str) -> bool:
    return (
        not item[:1].isdigit()
        and not item.startswith(("*", "&", "!", "{", "[", "'", '"'))
        and ": " not in item
        and " #" not in item
    )


def _link_args(layout: Layout, tls_on: bool) -> list[str]:
    bind = "${SUPERLINK_BIND:-127.0.0.1}" if layout.host else "0.0.0.0"
    port = str(layout.port) if layout.host else "8000"
    security = (
        [
            "--ssl-ca-certfile",
            "/certs/ca.crt",
            "--ssl-certfile",
            "/certs/server.crt",
            "--ssl-keyfile",
            "/certs/server.key",
            "--enable-supernode-auth",
        ]
        if tls_on
        else ["--insecure"]
    )
    return ["--isolation", "process", "--host", bind, "--port", port, *security]


def _node_args(layout: Layout, i: int, tls_on: bool) -> list[str]:
    security = (
        ["--root-certificates", "/certs/ca.crt", "--auth-supernode-private-key",
         "/certs/supernode.key"]
        if tls_on
        else ["--insecure"]
    )  # fmt: skip
    return [
        "--superlink",
        layout.link()[0],
        *security,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1" if layout.host else "0.0.0.0",
        "--port",
        str(layout.node_port(i)),
        "--node-config",
        node_config(layout, i),
    ]


def node_config(layout: Layout, i: int, data_path: str | None = None) -> str:
    """SuperNode i's node config (TOML values: strings in double quotes)."""
    data_path = layout.data_path if data_path is None else data_path
    extra = f' data-path="{data_path}"' if data_path else ""
    return f'partition-id={i - 1} num-partitions={layout.clients} worker-socket="{SOCKET}"{extra}'


def _data_example(layout: Layout, i: int, indent: int) -> str:
    return f"{' ' * indent}# - {node_config(layout, i, '/data/train.jsonl')}"


def _network(layout: Layout) -> list[str]:
    return ["    network_mode: host"] if layout.host else []


def _app_volumes(layout: Layout, i: int | None) -> list[str]:
    """Volumes of a fedtune container: the cache, client i's data and socket, user mounts."""
    lines = ["    volumes:", "      - fedtune-cache:/cache"]
    if i is None:
        lines.append('      - fedtune-runs:/app/runs     # output.dir = "runs/..." lands here')
    else:
        lines += [
            f"      - ${{CLIENT{i}_DATA:-./data/client-{i}}}:/data:ro",
            f"      - worker-{i}-socket:/run/fedtune",
        ]
    lines += [f"      - {m}" for m in layout.mounts]
    return lines


def _gpus(layout: Layout) -> list[str]:
    if not layout.gpus:
        return []
    return [
        "    deploy:                          # the host's NVIDIA GPUs (NVIDIA Container Toolkit)",
        "      resources:",
        "        reservations:",
        "          devices:",
        "            - driver: nvidia",
        "              count: all",
        "              capabilities: [gpu]",
    ]


HEADER = """\
# fedtune on Flower's Deployment Runtime, `--isolation process` layout, {n} SuperNodes
# ({network} network). Generated by `fedtune deploy compose {args}`;
# change the arguments and regenerate rather than editing by hand.
#
#   superlink    Flower image     Fleet + Control + Runtime APIs on one HTTP port
#   serverapp    fedtune image    flower-superexec -> starts flwr-serverapp per run
#   supernode-N  Flower image     connects to the SuperLink; serves its own Runtime API
#   clientapp-N  fedtune image    flower-superexec -> starts flwr-clientapp per message
#   worker-N     fedtune image    `fedtune worker`: keeps model + data warm across rounds;
#                                 clientapp-N's per-message processes relay train messages
#                                 to it over the Unix socket in the worker-N-socket volume
#
# Images are variables: SUPERLINK_IMAGE / SUPERNODE_IMAGE (default: Flower's official
# images) and FEDTUNE_IMAGE (deploy/Dockerfile; it also holds flower-superlink and
# flower-supernode, so one image can run every service). All must have flwr {flwr}.
#
#   docker compose -f deploy/compose.yml up --build -d        (from the repository root)
#   flwr run . local --run-config "set='federation.num_clients={n}'"   (deploy/README.md)
# Overlays: -f deploy/compose.tls.yml (TLS + SuperNode auth), -f deploy/compose.state.yml
# (SuperLink state survives restarts). tests/test_deploy_files.py checks every flag against
# the Flower {flwr} CLIs; relative paths are relative to this file's folder.
"""


ANCHOR = """\
# The fedtune image, shared by the ServerApp and ClientApp SuperExecs and the workers. Every
# service that uses it may build it; Docker's layer cache makes later builds instant. Without
# an image registry: deploy/build-local-image.sh, then FEDTUNE_IMAGE=fedtune:local.
x-fedtune: &fedtune
  image: ${FEDTUNE_IMAGE:-fedtune:latest}
  build:
    context: ..                      # the repository root (pyproject.toml, src/, recipes/)
    dockerfile: deploy/Dockerfile    # relative to the context
    args:                            # defaults = the CPU image; GPUs: deploy/README.md
      BASE: ${FEDTUNE_BASE:-python:3.11-slim}
      PYTHON: ${FEDTUNE_PYTHON:-python3}
      PYTHON_APT_PACKAGES: ${FEDTUNE_PYTHON_APT_PACKAGES:-}
      TORCH_INDEX_URL: ${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  restart: on-failure                # a SuperExec exits if its Runtime API is not up yet
  stop_signal: SIGINT"""


def _args_text(layout: Layout) -> str:
    args = [f"--clients {layout.clients}"]
    if layout.host:
        args.append(f"--network host --port {layout.port}")
    if layout.gpus:
        args.append("--gpus")
    if layout.tls:
        args.append("--tls")
    args += [f"--mount {shlex.quote(m)}" for m in layout.mounts]
    if layout.data_path:
        args.append(f"--data-path {shlex.quote(layout.data_path)}")
    return " ".join(args)


def base(layout: Layout) -> str:
    """compose.yml: the insecure base every overlay stacks on."""
    n, host = layout.clients, layout.host
    lines = HEADER.format(
        n=n, network=layout.network, args=_args_text(layout), flwr=FLWR_VERSION
    ).splitlines()
    lines += [
        "",
        *ANCHOR.splitlines(),
        "",
        "services:",
        "  superlink:",
        f"    image: ${{SUPERLINK_IMAGE:-flwr/superlink:{FLWR_VERSION}}}",
        "    entrypoint: [flower-superlink]   # the official image's; the fedtune image has it too",
        "    command:",
        *_list(
            _link_args(layout, False),
            6,
            {
                1: "ServerApps run in the `serverapp` container, not here",
                3: "SUPERLINK_BIND=0.0.0.0 where remote SuperNodes reach this host"
                if host
                else "reachable from the other containers",
                5: "Fleet (SuperNodes), Control (flwr CLI), Runtime (SuperExec)",
                6: "plain HTTP: fine on one machine; compose.tls.yml for more",
            },
        ),
        *_network(layout),
    ]
    if not host:
        lines += [
            "    ports:",
            "      # Published for the flwr CLI on this machine only. On a SuperLink host",
            "      # that remote SuperNodes reach: SUPERLINK_BIND=0.0.0.0 and compose.tls.yml.",
            "      - ${SUPERLINK_BIND:-127.0.0.1}:${SUPERLINK_PORT:-8000}:8000",
        ]
    lines += [
        "",
        "  serverapp:",
        "    <<: *fedtune",
        "    command:",
        *_list(
            ["flower-superexec", "--insecure", "--runtime-api-address", layout.link()[1]],
            6,
            {3: "the SuperLink's Runtime API (its one port)"},
        ),
        *_network(layout),
        *_app_volumes(layout, None),
        "    depends_on:",
        "      - superlink",
    ]
    for i in range(1, n + 1):
        lines += _node(layout, i, tls_on=False, overlay=False)
        lines += [
            "",
            f"  clientapp-{i}:",
            "    <<: *fedtune",
            "    command:",
            *_list(
                ["flower-superexec", "--insecure", "--runtime-api-address", layout.node_api(i)],
                6,
                {1: "to its own SuperNode, never leaving this host"},
            ),
            *_network(layout),
            *_app_volumes(layout, i),
            *_gpus(layout),
            "    depends_on:",
            f"      - supernode-{i}",
            f"      - worker-{i}",
            "",
            f"  worker-{i}:",
            "    <<: *fedtune",
            f"    command: [fedtune, worker, --socket, {SOCKET}]",
            *_network(layout),
            *_app_volumes(layout, i),
            *_gpus(layout),
        ]
    lines += [
        "",
        "volumes:",
        "  fedtune-cache: {}   # converted model weights, tokenized blocks, Hugging Face cache",
        "  fedtune-runs: {}    # run folders written by the ServerApp",
    ]
    lines += [f"  worker-{i}-socket: {{}}" for i in range(1, n + 1)]
    return "\n".join(lines) + "\n"


def _node(layout: Layout, i: int, tls_on: bool, overlay: bool) -> list[str]:
    args = _node_args(layout, i, tls_on)
    lines = ["", f"  supernode-{i}:"]
    if not overlay:
        lines += [
            f"    image: ${{SUPERNODE_IMAGE:-flwr/supernode:{FLWR_VERSION}}}",
            "    entrypoint: [flower-supernode]",
        ]
    lines += ["    command:", *_list(args[:-1], 6)]
    if layout.data_path:
        lines += [f"      # data-path: client {i}'s own data, in CLIENT{i}_DATA (mounted at /data)"]
        lines += _list(args[-1:], 6)
    else:
        lines += [
            "      # which shard of data.source; num-partitions = the recipe's "
            "federation.num_clients"
        ]
        lines += _list(args[-1:], 6)
        lines += ["      # own data instead of a shard (`fedtune deploy compose --data-path`):"]
        lines.append(_data_example(layout, i, 6))
    if overlay:
        lines += [
            "    volumes:",
            "      - ${CERTS_DIR:-./certs}/ca.crt:/certs/ca.crt:ro",
            f"      - ${{CERTS_DIR:-./certs}}/supernode-{i}.key:/certs/supernode.key:ro",
        ]
    else:
        lines += [
            *_network(layout),
            "    restart: on-failure",
            "    depends_on:",
            "      - superlink",
        ]
    return lines


TLS_HEADER = """\
# Overlay: TLS on the SuperLink + SuperNode authentication, for the {n} SuperNodes of
# compose.yml. Generated by `fedtune deploy compose {args}`.
#
#   deploy/certs.sh -n {n}         # CA, SuperLink cert, supernode-N.key/.pub in deploy/certs
#   sudo chown 49999:49999 deploy/certs/server.key deploy/certs/supernode-*.key
#   docker compose -f deploy/compose.yml -f deploy/compose.tls.yml up --build -d
#   flwr supernode register deploy/certs/supernode-1.pub local-tls   # once per SuperNode key
#
# The containers run as uid 49999 and must read the private keys (mode 600, hence chown).
# Compose replaces a service's whole `command` when an overlay sets it, so every command
# below is complete (not a diff); `volumes` are merged by container path.
#
# Encrypted: everything that crosses the SuperLink's port (SuperNodes <-> Fleet API, flwr CLI
# <-> Control API, ServerApp SuperExec <-> Runtime API), all with one server certificate whose
# names must include how each client reaches it (`superlink` inside compose, 127.0.0.1 and
# localhost from this host, the public name for remote SuperNodes: `deploy/certs.sh NAME`).
# Plain: each ClientApp SuperExec <-> its own SuperNode's Runtime API, which never leaves one
# host. --enable-supernode-auth: only SuperNodes whose public key was registered with `flwr
# supernode register` may connect; `restart: on-failure` retries one until it is registered.
"""


def tls(layout: Layout) -> str:
    """compose.tls.yml: TLS and SuperNode authentication over compose.yml."""
    lines = TLS_HEADER.format(n=layout.clients, args=_args_text(layout)).splitlines()
    lines += [
        "",
        "services:",
        "  superlink:",
        "    command:",
        *_list(_link_args(layout, True), 6),
        "    volumes:",
        "      # Only what the SuperLink needs: never ca.key or SuperNode private keys.",
        "      - ${CERTS_DIR:-./certs}/ca.crt:/certs/ca.crt:ro",
        "      - ${CERTS_DIR:-./certs}/server.crt:/certs/server.crt:ro",
        "      - ${CERTS_DIR:-./certs}/server.key:/certs/server.key:ro",
        "",
        "  serverapp:",
        "    command:",
        *_list(
            [
                "flower-superexec",
                "--root-certificates",
                "/certs/ca.crt",
                "--runtime-api-address",
                layout.link()[1],
            ],
            6,
            {4: "a name in server.crt"},
        ),  # fmt: skip
        "    volumes:",
        "      - ${CERTS_DIR:-./certs}/ca.crt:/certs/ca.crt:ro",
    ]
    for i in range(1, layout.clients + 1):
        lines += _node(layout, i, tls_on=True, overlay=True)
    lines += [
        "",
        "  # clientapp-N, worker-N: unchanged (their SuperNode's API stays on this host).",
    ]
    return "\n".join(lines) + "\n"
