"""A `fedtune deploy compose` layout brought up with Docker Compose on this machine.

Host network, TLS and SuperNode authentication, one shared folder mounted at the same path
in every fedtune container: what deploy/README.md's three machines run, on one. The
harness of tests/test_docker.py and of the Docker column of bench/deploy_overhead.py; the
image is built beforehand (deploy/build-local-image.sh) and the certificates made by
deploy/certs.sh. Everything it started is removed on exit (containers, networks, volumes).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from fedtune import compose
from fedtune.deploy import Connection
from fedtune.errors import DeployError

APP_UID = 49999  # the fedtune image's user, as in Flower's official images


def docker_problem(need_root: bool = True) -> str | None:
    """Why Docker Compose cannot be used here (None if it can)."""
    if not shutil.which("docker"):
        return "no `docker` command"
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return "no Docker daemon reachable: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    if need_root and os.geteuid() != 0:
        return "not root: the SuperNode keys cannot be handed to the containers' uid 49999"
    return None


def compose_command() -> list[str] | None:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`)."""
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if v2.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


class ComposeDeployment:
    """`clients` SuperNodes in containers of `image`; use as a context manager.

    `work` is mounted at its own path in every fedtune container (recipe paths, model, data
    and the run folder live there, readable by uid 49999); `certs` holds deploy/certs.sh's
    files for `clients` SuperNodes."""

    def __init__(self, work: Path, certs: Path, clients: int, image: str, port: int):
        self.work, self.certs, self.clients, self.port = Path(work), Path(certs), clients, port
        self.files = self.work / "compose"
        self.name = f"fedtune-{uuid.uuid4().hex[:8]}"
        self.env = os.environ | {
            "FEDTUNE_IMAGE": image,
            "SUPERLINK_IMAGE": image,  # the fedtune image holds flower-superlink/-supernode
            "SUPERNODE_IMAGE": image,
            "CERTS_DIR": str(self.certs),
            "COMPOSE_PROJECT_NAME": self.name,
            **{f"CLIENT{i}_DATA": str(self.work / f"data-{i}") for i in range(1, clients + 1)},
        }
        self.conn = Connection(
            self.work / "flwr", f"127.0.0.1:{port}", self.certs / "ca.crt", os.environ
        )
        self.status_every_s, self.poll_s = 30.0, 2.0

    def compose(self, *args: str, check: bool = True, timeout: float = 300):
        cmd = [*(compose_command() or ["docker-compose"]), "-f", "compose.yml"]
        cmd += ["-f", "compose.tls.yml", *args]
        proc = subprocess.run(
            cmd, cwd=self.files, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise DeployError(f"compose {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr}")
        return proc

    def __enter__(self):
        layout = compose.Layout(
            self.clients, "host", self.port, mounts=(f"{self.work}:{self.work}",), tls=True
        )
        compose.write(layout, self.files)
        for key in [self.certs / "server.key", *self.certs.glob("supernode-*.key")]:
            os.chown(key, APP_UID, APP_UID)  # mode 600: the containers' user must own them
        for i in range(1, self.clients + 1):
            (self.work / f"data-{i}").mkdir(exist_ok=True)
        try:
            self.compose("up", "-d", "--no-build", timeout=600)
            self.healthy()
            for i in range(1, self.clients + 1):
                self.conn.register(self.certs / f"supernode-{i}.pub")
        except BaseException:
            self.__exit__()
            raise
        return self

    def healthy(self, timeout: float = 120) -> None:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                url = f"https://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise DeployError(f"the SuperLink is not healthy:\n{self.logs('superlink')}")

    def logs(self, *services: str) -> str:
        proc = self.compose("logs", "--no-color", "--tail", "40", *services, check=False)
        return proc.stdout[-4000:]

    def wait(self, run_id: int, run_dir: Path, timeout: float) -> dict:
        """Until the run's status is finished; `flwr ls` (~2 CPU-s) only when summary.json
        appears or every `status_every_s`, as in LocalDeployment.wait."""
        deadline, info, asked = time.time() + timeout, {}, 0.0
        while time.time() < deadline:
            if (run_dir / "summary.json").exists() or time.time() - asked >= self.status_every_s:
                info, asked = self.conn.status(run_id), time.time()
                if str(info.get("status", "")).startswith("finished"):
                    return info
            time.sleep(self.poll_s)
        raise DeployError(f"run {run_id}: {info}\n{self.logs()}")

    def __exit__(self, *exc):
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
