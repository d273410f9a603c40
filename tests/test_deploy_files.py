"""deploy/: the Docker compose files, Dockerfile and certs.sh, checked without Docker.

No Docker engine is needed (nor used): the compose files are parsed with PyYAML and merged the
way compose merges overlays; every flag given to flower-superlink / flower-supernode /
flower-superexec must exist in the installed CLI's `--help` (so a flag Flower renames fails
here, not at `docker compose up`), and every full command must get through the real CLI's
argument parser. certs.sh is run for real (openssl, ssh-keygen) into a temporary folder.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from fedtune import compose

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flower-superexec")
# What `docker compose -f A -f B ...` is documented to be used with (deploy/README.md).
COMBOS = [
    ("compose.yml",),
    ("compose.yml", "compose.tls.yml"),
    ("compose.yml", "compose.state.yml"),
    ("compose.yml", "compose.tls.yml", "compose.state.yml"),
    ("compose.yml", "compose.state.yml", "compose.tls.yml"),
]
COMBO_IDS = ["+".join({"compose.yml": "base"}.get(f) or f.split(".")[1] for f in c) for c in COMBOS]
# `fedtune deploy compose` output beyond the committed 2 SuperNodes: 3 on the host network
# with TLS and a user mount (what the Docker test runs), and 1 on compose's bridge network.
GENERATED = Path(tempfile.mkdtemp(prefix="fedtune-compose-"))
atexit.register(shutil.rmtree, GENERATED, ignore_errors=True)
LAYOUTS = {
    "host3": compose.Layout(
        3, "host", 39100, mounts=("/srv/run:/srv/run",), tls=True, data_path="/data/own.jsonl"
    ),
    "bridge1": compose.Layout(1, gpus=True),
}
for _key, _layout in LAYOUTS.items():
    compose.write(_layout, GENERATED / _key)
COMBOS += [
    (str(GENERATED / "host3/compose.yml"),),
    (str(GENERATED / "host3/compose.yml"), str(GENERATED / "host3/compose.tls.yml")),
    (str(GENERATED / "bridge1/compose.yml"),),
]
COMBO_IDS += ["host3", "host3+tls", "bridge1"]
ENV = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


# ---- compose semantics (the subset these files use) -----------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value):
    """Compose interpolation with every variable unset: `${X:-default}` -> default."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(3) or ""), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def _as_list(value):
    return value if isinstance(value, list) else value.split() if isinstance(value, str) else []


def _volume_target(v) -> str:
    return v["target"] if isinstance(v, dict) else v.split(":")[1]


def _merge_service(base: dict, over: dict) -> dict:
    """Compose's override rules: command/entrypoint replaced whole; volumes merged by
    container path; depends_on/environment merged by key; other mappings merged deeply."""
    out = dict(base)
    for key, value in over.items():
        if key == "volumes":
            merged = {_volume_target(v): v for v in base.get(key, [])}
            merged.update({_volume_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key in ("depends_on", "environment"):

            def as_map(x):
                return {k: {} for k in x} if isinstance(x, list) else dict(x)

            out[key] = as_map(base.get(key, {})) | as_map(value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge_service(base[key], value)
        else:  # command, entrypoint, image, scalars, lists
            out[key] = value
    return out


@cache
def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())  # an absolute name stays itself


def merged(combo) -> dict[str, dict]:
    services: dict[str, dict] = {}
    for name in combo:
        for svc, cfg in (load(name).get("services") or {}).items():
            services[svc] = _merge_service(services.get(svc, {}), cfg or {})
    return {k: interpolate(v) for k, v in services.items()}


def is_fedtune_image(svc: dict) -> bool:
    build = svc.get("build") or {}
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def argv(svc: dict) -> list[str]:
    """The process a service runs: its entrypoint (or the image's) followed by `command`."""
    command = _as_list(svc.get("command"))
    if "entrypoint" in svc:
        return _as_list(svc["entrypoint"]) + command
    image = svc.get("image", "")
    for cli in ("superlink", "supernode", "superexec"):  # the official images' entrypoints
        if image.startswith(f"flwr/{cli}:"):
            return [f"flower-{cli}"] + command
    assert is_fedtune_image(svc), f"unknown image {image!r}: declare its entrypoint here"
    return command  # deploy/Dockerfile has no ENTRYPOINT (checked below)


def flower_services(combo) -> dict[str, list[str]]:
    """name -> argv of every service that runs a Flower CLI."""
    return {
        name: argv(svc)
        for name, svc in merged(combo).items()
        if argv(svc) and argv(svc)[0] in FLOWER_CLIS
    }


def of(services: dict[str, list[str]], cli: str) -> dict[str, list[str]]:
    return {k: v for k, v in services.items() if v[0] == cli}


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def host_network(combo) -> bool:
    """Every container on the host's network (`--network host`): servers bind 127.0.0.1 and
    are reached there, each on its own port; otherwise they bind 0.0.0.0 and are reached by
    service name."""
    modes = {svc.get("network_mode") for svc in merged(combo).values()}
    assert len(modes) == 1, modes  # all or none
    return modes == {"host"}


def reached_as(combo, service: str) -> str:
    return "127.0.0.1" if host_network(combo) else service


def clients_of(combo) -> int:
    folder = Path(combo[0]).parent.name
    return LAYOUTS[folder].clients if folder in LAYOUTS else 2


# ---- the real CLIs ----------------------------------------------------------------------------


def _help(cli: str) -> frozenset[str]:
    proc = subprocess.run(
        [str(BIN / cli), "--help"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", proc.stdout))


@pytest.fixture(scope="module")
def help_flags() -> dict[str, frozenset[str]]:
    """cli -> the flags its real `--help` lists (the three CLIs queried in parallel)."""
    with ThreadPoolExecutor(len(FLOWER_CLIS)) as pool:
        return dict(zip(FLOWER_CLIS, pool.map(_help, FLOWER_CLIS), strict=True))


# Runs each command through the CLI's own entry point (what bin/flower-* calls) with `--help`
# appended: argparse checks each value as it consumes it (choices like `--isolation process`,
# types like `--port`), and `--help` then exits before anything starts. One process for all.
_PARSE_HELPER = r"""
import contextlib, io, json, sys
from importlib.metadata import entry_points
results = []
for args in json.loads(sys.stdin.read()):
    (ep,) = entry_points(group="console_scripts", name=args[0])
    fn = ep.load()
    sys.argv = [*args, "--help"]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            fn()
            code = "returned without exiting"
        except SystemExit as e:
            code = e.code or 0
    results.append([code, err.getvalue()[-2000:]])
print(json.dumps(results))
"""


# Two wrong commands ride along, to show the helper does reject what it should.
BAD_COMMANDS = [
    ("flower-superlink", "--isolation", "container"),
    ("flower-supernode", "--port", "90940000"),
]


@pytest.fixture(scope="module")
def parse_results() -> dict[tuple, list]:
    commands = sorted({tuple(a) for combo in COMBOS for a in flower_services(combo).values()})
    commands += BAD_COMMANDS
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE_HELPER],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(commands, json.loads(proc.stdout.strip().splitlines()[-1]), strict=True))


# ---- certs.sh ---------------------------------------------------------------------------------


def _certs_tools() -> None:
    missing = [t for t in ("openssl", "ssh-keygen", "bash") if not shutil.which(t)]
    if missing:
        pytest.skip(f"certs.sh needs {', '.join(missing)}")


def run_certs(out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(DEPLOY / "certs.sh"), "-o", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def san(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> Path:
    """What `deploy/certs.sh` creates by default, for as many SuperNodes as compose has."""
    _certs_tools()
    n = len(of(flower_services(COMBOS[1]), "flower-supernode"))
    out = tmp_path_factory.mktemp("certs")
    run_certs(out, "-n", str(n))
    return out


# ---- tests: flags and commands ---------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_every_flag_exists_in_the_installed_flower_cli(combo, help_flags):
    services = flower_services(combo)
    assert {a[0] for a in services.values()} == set(FLOWER_CLIS), services
    for name, args in services.items():
        unknown = [f for f in flags(args[1:]) if f not in help_flags[args[0]]]
        assert not unknown, f"{name}: {args[0]} --help has no {unknown}"


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_every_command_parses_with_the_real_cli(combo, parse_results):
    for name, args in flower_services(combo).items():
        code, err = parse_results[tuple(args)]
        assert code == 0, f"{name}: {' '.join(args)}\n{err}"


def test_the_helper_would_catch_a_bad_value(parse_results):
    """Guard against a vacuous pass: the same helper rejects a bad choice and a bad port."""
    for bad in BAD_COMMANDS:
        code, err = parse_results[bad]
        assert code == 2 and "error: argument" in err, (bad, code, err)


def test_flower_images_match_the_pinned_flwr_version():
    pinned = next(
        re.search(r"==([\w.]+)", d).group(1)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("flwr[")
    )
    assert pinned == version("flwr")  # the CLIs whose --help the tests read
    for combo in COMBOS:
        for name, svc in merged(combo).items():
            if svc.get("image", "").startswith("flwr/"):
                assert svc["image"].split(":")[1] == pinned, (name, svc["image"])


# ---- tests: topology ------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_supernodes_have_distinct_partitions_and_one_size(combo):
    from flwr.common.config import parse_config_args  # the parser flower-supernode uses

    nodes = of(flower_services(combo), "flower-supernode")
    configs = [parse_config_args([value(a, "--node-config")]) for a in nodes.values()]
    n = len(configs)
    assert n == clients_of(combo)
    assert sorted(c["partition-id"] for c in configs) == list(range(n)), configs
    assert {c["num-partitions"] for c in configs} == {n}, configs
    own = "/data/own.jsonl" if "host3" in COMBO_IDS[COMBOS.index(combo)] else None
    assert {c.get("data-path") for c in configs} == {own}, configs  # --data-path, or shards


def test_commented_data_path_examples_are_valid_node_configs():
    """The `data-path=...` lines left commented for users must parse when uncommented
    (node-config values are TOML: a path needs double quotes)."""
    from flwr.common.config import parse_config_args

    examples = [
        line.split("- ", 1)[1].strip().strip("'")
        for name in ("compose.yml", "compose.tls.yml")
        for line in (DEPLOY / name).read_text().splitlines()
        if re.match(r"\s*#\s*- .*data-path=", line)
    ]
    assert len(examples) >= 4, examples  # each SuperNode, in compose.yml and compose.tls.yml
    for example in examples:
        cfg = parse_config_args([example])
        assert cfg["data-path"].startswith("/data/"), cfg  # inside the clientapp's /data mount


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_superexecs_point_at_existing_runtime_apis(combo):
    services = merged(combo)
    flower = flower_services(combo)
    link = of(flower, "flower-superlink")
    assert len(link) == 1
    ((link_name, link_args),) = link.items()
    assert value(link_args, "--isolation") == "process"
    bind = "127.0.0.1" if host_network(combo) else "0.0.0.0"  # reachable by the others
    assert value(link_args, "--host") == bind
    link_port = int(value(link_args, "--port"))
    link = (reached_as(combo, link_name), link_port)

    nodes = of(flower, "flower-supernode")
    served_by_node = {}
    for name, args in nodes.items():
        assert value(args, "--isolation") == "process", name
        assert value(args, "--host") == bind, name
        assert host_port(value(args, "--superlink")) == link, name
        served_by_node[(reached_as(combo, name), int(value(args, "--port")))] = []
    assert len(served_by_node) == len(nodes)  # on the host network: one port each

    server_execs = []
    for name, args in of(flower, "flower-superexec").items():
        target = host_port(value(args, "--runtime-api-address"))
        assert is_fedtune_image(services[name]), f"{name}: app processes need the fedtune image"
        if target == link:
            server_execs.append(name)
        else:
            assert target in served_by_node, f"{name} points at {target}: no such SuperNode API"
            served_by_node[target].append(name)
    assert len(server_execs) == 1, server_execs
    assert all(len(v) == 1 for v in served_by_node.values()), served_by_node  # one each


def mounts(svc: dict) -> dict[str, str]:
    """container path -> source of a service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        out[target] = source
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_every_supernode_names_a_worker_its_clientapp_reaches(combo):
    """node config `worker-socket` is read by the ClientApp (in clientapp-N): the folder of
    that path must be a volume clientapp-N shares with exactly one `fedtune worker` whose
    --socket is that path, and the worker sees the same data and cache as the ClientApp."""
    from flwr.common.config import parse_config_args

    services, flower = merged(combo), flower_services(combo)
    workers = {n: argv(s) for n, s in services.items() if argv(s)[:2] == ["fedtune", "worker"]}
    volumes_used = []
    for node, args in of(flower, "flower-supernode").items():
        sock = parse_config_args([value(args, "--node-config")])["worker-socket"]
        folder = str(Path(sock).parent)
        api = (reached_as(combo, node), int(value(args, "--port")))
        (app,) = [
            n
            for n, a in of(flower, "flower-superexec").items()
            if host_port(value(a, "--runtime-api-address")) == api
        ]
        volume = mounts(services[app])[folder]
        mine = [n for n, a in workers.items() if mounts(services[n]).get(folder) == volume]
        assert len(mine) == 1, (node, app, mine)
        assert value(workers[mine[0]], "--socket") == sock, mine
        for path in ("/data", "/cache"):
            assert mounts(services[mine[0]])[path] == mounts(services[app])[path], (mine, path)
        volumes_used.append(volume)
    assert len(set(volumes_used)) == len(volumes_used), volumes_used  # one pair per socket


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_tls_settings_agree_on_both_ends_of_every_link(combo):
    flower = flower_services(combo)
    (link_args,) = of(flower, "flower-superlink").values()
    link_tls = "--insecure" not in link_args
    assert link_tls == any(f.endswith("compose.tls.yml") for f in combo)
    nodes = of(flower, "flower-supernode")
    node_tls = {
        (reached_as(combo, name), int(value(a, "--port"))): "--ssl-certfile" in a
        for name, a in nodes.items()
    }
    for name, args in {**nodes, **of(flower, "flower-superexec")}.items():
        target = value(args, "--runtime-api-address")  # None for SuperNodes: they dial the link
        server_tls = node_tls.get(host_port(target), link_tls) if target else link_tls
        if server_tls:
            assert "--insecure" not in args and value(args, "--root-certificates"), name
        else:
            assert "--insecure" in args and "--root-certificates" not in args, name


# ---- tests: TLS overlay and certs.sh ---------------------------------------------------------


def test_tls_overlay_mounts_what_certs_sh_creates(certs_dir):
    created = {p.name for p in certs_dir.iterdir()}
    services = merged(COMBOS[1])
    flower = flower_services(COMBOS[1])
    ((link_name, link_args),) = of(flower, "flower-superlink").items()
    assert "--enable-supernode-auth" in link_args
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert value(link_args, flag), flag
    keys = set()
    for name, args in flower.items():
        mounts = {}
        for v in services[name].get("volumes", []):
            source, target = v.split(":")[:2]
            mounts[target] = source
        for flag in (
            "--ssl-ca-certfile",
            "--ssl-certfile",
            "--ssl-keyfile",
            "--root-certificates",
            "--auth-supernode-private-key",
        ):
            path = value(args, flag)
            if path is None:
                continue
            assert path in mounts, f"{name}: {flag} {path} is not mounted"
            source = Path(mounts[path])
            assert source.parent == Path("./certs"), (name, source)  # ${CERTS_DIR:-./certs}
            assert source.name in created, f"{name}: certs.sh creates no {source.name}"
            assert source.name != "ca.key", "the CA key must never be mounted"
            if flag == "--auth-supernode-private-key":
                keys.add(source.name)
    assert len(keys) == len(of(flower, "flower-supernode")), keys  # one key per SuperNode


def test_tls_certificate_names_every_address_used_to_reach_the_superlink(certs_dir):
    names = san(certs_dir / "server.crt")
    flower = flower_services(COMBOS[1])
    supernodes = set(of(flower, "flower-supernode"))
    for name, args in flower.items():
        for flag in ("--superlink", "--runtime-api-address"):
            address = value(args, flag)
            if address and host_port(address)[0] not in supernodes:
                assert f"DNS:{host_port(address)[0]}" in names, (name, address, names)
    assert "IP Address:127.0.0.1" in names and "DNS:localhost" in names  # flwr CLI on the host


def test_certs_sh_makes_a_verifiable_server_certificate_and_supernode_keys(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    _certs_tools()
    out = tmp_path / "certs"
    run_certs(out, "-n", "3", "superlink.example.org", "203.0.113.7")
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    names = san(out / "server.crt")
    for expected in (
        "IP Address:127.0.0.1",
        "DNS:localhost",
        "DNS:superlink",
        "DNS:superlink.example.org",
        "IP Address:203.0.113.7",
    ):
        assert expected in names, names
    for i in (1, 2, 3):
        # exactly what flower-supernode / `flwr supernode register` load
        pub = load_ssh_public_key((out / f"supernode-{i}.pub").read_bytes())
        key = load_ssh_private_key((out / f"supernode-{i}.key").read_bytes(), None)
        assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert (out / f"supernode-{i}.key").stat().st_mode & 0o077 == 0  # private: owner only
    assert (out / "server.key").stat().st_mode & 0o077 == 0
    assert not (out / "supernode-4.pub").exists()

    # Idempotent: a re-run changes nothing; a new name re-issues only the server certificate
    # (same key, old names kept); more SuperNodes add keys, keeping the old ones.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_certs(out, "-n", "3", "superlink.example.org", "203.0.113.7")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_certs(out, "-n", "4", "other.example.org")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "DNS:other.example.org" in san(out / "server.crt")
    assert "DNS:superlink.example.org" in san(out / "server.crt")
    assert after["server.crt"] != before["server.crt"]
    for same in ("ca.key", "ca.crt", "server.key", "supernode-1.key", "supernode-3.pub"):
        assert after[same] == before[same], same
    assert "supernode-4.pub" in after


# ---- tests: state overlay and Dockerfile ------------------------------------------------------


def test_state_overlay_persists_the_database_in_a_writable_volume():
    for combo in (COMBOS[2], COMBOS[3], COMBOS[4]):
        services = merged(combo)
        link = services["superlink"]
        database = value(argv(link), "--database")
        assert database and database.startswith("/app/state/"), argv(link)
        volumes = {_volume_target(v): v.split(":")[0] for v in link["volumes"]}
        assert volumes["/app/state"] in load("compose.state.yml")["volumes"]  # a named volume
        # the volume is handed to the SuperLink's uid before it starts
        init = services[next(iter(link["depends_on"]))]
        assert argv(init)[:2] == ["chown", "49999:49999"] and "/app/state" in argv(init)
        assert link["depends_on"][next(iter(link["depends_on"]))] == {
            "condition": "service_completed_successfully"
        }


def _dockerfile() -> tuple[str, dict[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # join continuation lines
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", logical, flags=re.M))
    return logical, args


def test_dockerfile_pins_torch_and_installs_what_the_tests_expect():
    text, args = _dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    assert args["TORCH_VERSION"] == "2.13.0"
    assert re.search(
        r'pip install "torch==\$\{TORCH_VERSION\}" --index-url '
        r'"\$\{TORCH_INDEX_URL\}"',
        text,
    )
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["BASE"] == "python:3.11-slim"
    assert "--no-deps --require-hashes -r /src/requirements/offline-assets.txt" in text
    # torch comes first, so `pip install .` finds the pinned CPU build already satisfied
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("RUN pip install /src")
    # compose builds it without overriding the torch pin
    for combo in COMBOS:
        for svc in merged(combo).values():
            if is_fedtune_image(svc):
                assert "TORCH_VERSION" not in (svc["build"].get("args") or {})


def test_dockerfile_copies_existing_paths_runs_unprivileged_and_has_no_entrypoint():
    text, args = _dockerfile()
    for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M):
        *sources, _dest = [w for w in line.split() if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users == ["${APP_UID}:${APP_UID}"], users  # non-root, and the last word on it
    assert args["APP_UID"] == "49999"  # = the flwr/* images' user: one chown fits all mounts
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, flags=re.M)  # compose gives commands
    for env in (
        "FLWR_TELEMETRY_ENABLED=0",
        "FLWR_DISABLE_UPDATE_CHECK=1",
        "HF_HUB_DISABLE_PROGRESS_BARS=1",
    ):
        assert env in text, env


# ---- tests: `fedtune deploy compose` ----------------------------------------------------------


def test_the_committed_compose_files_are_the_generators_output(tmp_path):
    """deploy/compose.yml and compose.tls.yml are `fedtune deploy compose --clients 2 --tls`;
    edit the generator (src/fedtune/compose.py), then regenerate."""
    from fedtune.cli import main

    assert main(["deploy", "compose", "--clients", "2", "--tls", "--out", str(tmp_path)]) == 0
    for name in ("compose.yml", "compose.tls.yml"):
        assert (tmp_path / name).read_text() == (DEPLOY / name).read_text(), name


def fedtune_services(services: dict) -> dict:
    return {n: s for n, s in services.items() if is_fedtune_image(s)}


def test_mounts_and_gpus_go_to_every_fedtune_container_and_only_there():
    for combo in (COMBOS[-3], COMBOS[-1]):  # host3 (a mount), bridge1 (GPUs)
        services = merged(combo)
        layout = LAYOUTS[Path(combo[0]).parent.name]
        apps = fedtune_services(services)
        assert len(apps) == 1 + 2 * layout.clients  # serverapp, clientapp-i, worker-i
        for name, svc in services.items():
            for m in layout.mounts:
                target = m.split(":")[1]
                assert (mounts(svc).get(target) == m.split(":")[0]) == (name in apps), name
            gpus = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
            wants = layout.gpus and name.startswith(("clientapp-", "worker-"))
            assert bool(gpus) == wants, name
            if wants:
                assert gpus["devices"] == [
                    {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
                ]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--clients", "0"], "--clients 0: must be 1 or more"),
        (["--clients", "2", "--mount", "/only/one/part"], "--mount /only/one/part: give"),
        (["--clients", "2", "--mount", "/a:/b:rw"], "--mount /a:/b:rw: give"),
        (["recipes/demo.toml", "--clients", "2"], "deploy compose takes no recipe"),
    ],
)
def test_deploy_compose_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, says):
    from fedtune.cli import main

    assert main(["deploy", "compose", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written
