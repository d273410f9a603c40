"""`fedtune deploy local`: a real Flower Deployment Engine on this machine.

Starts one `flower-superlink` and N `flower-supernode` processes on 127.0.0.1 (optionally
with TLS and SuperNode authentication), submits the experiment with `flwr run`, follows it
through the run folder, judges the outcome by the run's final status (`flwr run` exits 0
even when the ServerApp crashed) and tears every process down, also on Ctrl-C or failure.
The same processes are what a multi-machine deployment runs (see deploy/README.md); this is
both a way to try deployment and the harness of the deployment tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedtune import config as C
from fedtune.apps import write_app_folder
from fedtune.errors import DeployError
from fedtune.interrupt import descendants
from fedtune.results import clear_old_run, read_metrics
from fedtune.simulation import prepare

BIN = Path(sys.executable).parent
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a process group (a Flower process and what it spawned), SIGKILL if needed."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def make_tls(folder: Path, num_nodes: int) -> dict[str, Path]:
    """A CA, a SuperLink certificate for 127.0.0.1/localhost, and one SSH-format P-384 key
    pair per SuperNode (Flower's node authentication format)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, sign_key, ca: bool, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    def pem_key(key):
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune local CA")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]),
        ca_name,
        srv_key,
        ca_key,
        ca=False,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    files = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(pem_key(srv_key))
    for i in range(num_nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}"] = folder / f"supernode-{i}"
        files[f"node{i}"].write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        files[f"node{i}.pub"] = folder / f"supernode-{i}.pub"
        files[f"node{i}.pub"].write_bytes(
            k.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
    return files


class Connection:
    """The `flwr` CLI pointed at one SuperLink, with a FLWR_HOME of its own: submit a run,
    read its status, register SuperNode keys. Local processes and containers alike."""

    def __init__(self, work: Path, address: str, root_cert: Path | None, env: dict):
        self.work = Path(work)
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = env | {"FLWR_HOME": str(home)}
        conn = f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{address}"\n'
        conn += f'root-certificates = "{root_cert}"\n' if root_cert else "insecure = true\n"
        (home / "config.toml").write_text(conn)

    def flwr(self, args: list[str], check: bool = False, timeout: float = 120):
        proc = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.work,
        )
        if check and proc.returncode != 0:
            raise DeployError(f"flwr {' '.join(args[:2])} failed: {proc.stdout}{proc.stderr}")
        return proc

    def submit(self, cfg: C.Config) -> int:
        """`flwr run` the fedtune app with the resolved config; returns the run id."""
        app = write_app_folder(self.work / "app")
        text = cfg.to_json()
        if "'" in text:
            raise DeployError(
                "the resolved config contains a single quote, which cannot "
                "travel inside Flower's --run-config; rename the path"
            )
        proc = self.flwr(
            ["run", str(app), "local", "--format", "json", "--run-config", f"config-json='{text}'"],
            check=True,
        )
        reply = json.loads(proc.stdout)
        if not reply.get("success"):
            raise DeployError(f"flwr run was refused: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict:
        proc = self.flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"])
        try:
            return json.loads(proc.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            return {"status": "unknown", "status-details": proc.stdout + proc.stderr}

    def register(self, public_key: Path) -> None:
        self.flwr(["supernode", "register", str(public_key), "local"], check=True)


class LocalDeployment:
    """SuperLink + N SuperNodes as real processes; use as a context manager."""

    def __init__(
        self,
        work: Path,
        num_nodes: int,
        tls: bool = False,
        auth: bool = False,
        node_configs: list[str] | None = None,
        workers: bool = False,
    ):
        self.work, self.n, self.tls, self.auth = Path(work), num_nodes, tls or auth, auth
        # a `fedtune worker` per SuperNode; sockets in a short folder (Unix paths <= 107 bytes)
        self.sockets = Path(tempfile.mkdtemp(prefix="fedtune-")) if workers else None
        self.node_configs = node_configs or [""] * num_nodes
        self.port = free_port()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.poll_s, self.status_every_s = 2.0, 30.0  # run folder / `flwr ls` (see wait)
        self.files: dict[str, Path] = {}
        self.env = os.environ | {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # superexec by name
            "FLWR_HOME": str(self.work / "flwr-home"),  # the FABs of this deployment's runs
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    # -- processes -------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.work / f"{name}.log").open("a")  # a restarted worker appends
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # own group: stop takes children
        self.procs.append((name, proc))
        return proc

    def log_of(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self):
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        link = [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            self.files = make_tls(self.work / "certs", self.n)
            link += [
                "--ssl-ca-certfile",
                str(self.files["ca"]),
                "--ssl-certfile",
                str(self.files["cert"]),
                "--ssl-keyfile",
                str(self.files["key"]),
            ]
        else:
            link += ["--insecure"]
        if self.auth:
            link += ["--enable-supernode-auth"]
        ca = self.files.get("ca")
        self.conn = Connection(self.work, f"127.0.0.1:{self.port}", ca, self.env)
        proc = self._start("superlink", link)
        self._wait_healthy(proc)
        for i in range(self.n):
            if self.sockets:
                self.start_worker(i)
            if self.auth:
                self.register(self.files[f"node{i}.pub"])
            self.start_supernode(i)

    def socket_of(self, i: int) -> Path:
        return self.sockets / f"worker-{i}.sock"

    def start_worker(self, i: int) -> subprocess.Popen:
        args = [str(BIN / "fedtune"), "worker", "--socket", str(self.socket_of(i))]
        return self._start(f"worker-{i}", args)

    def start_supernode(
        self,
        i: int,
        key: Path | None = None,
        root_cert: Path | None = None,
        name: str | None = None,
    ) -> subprocess.Popen:
        node_config = f"partition-id={i} num-partitions={self.n} {self.node_configs[i]}"
        if self.sockets:
            node_config += f' worker-socket="{self.socket_of(i)}"'
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config.strip(),
            "--max-retries",
            "3",
            "--max-wait-time",
            "20",
        ]
        if self.tls:
            args += ["--root-certificates", str(root_cert or self.files["ca"])]
        else:
            args += ["--insecure"]
        if key is not None or self.auth:
            args += ["--auth-supernode-private-key", str(key or self.files[f"node{i}"])]
        return self._start(name or f"supernode-{i}", args)

    def register(self, public_key: Path) -> None:
        self.conn.register(public_key)

    def _wait_healthy(self, proc, timeout=60) -> None:
        scheme = "https" if self.tls else "http"
        ctx = ssl.create_default_context(cafile=str(self.files["ca"])) if self.tls else None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"flower-superlink exited:\n{self.log_of('superlink')[-3000:]}")
            try:
                with urllib.request.urlopen(
                    f"{scheme}://127.0.0.1:{self.port}/health", timeout=2, context=ctx
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise DeployError("the SuperLink did not become healthy in time")

    def check_nodes(self) -> None:
        """A SuperNode that exited (refused certificate, unregistered key, crash) is an error
        now, not a run that waits forever for its missing client. A worker that died is
        restarted (meanwhile its SuperNode's ClientApps train in their own process)."""
        for name, proc in list(self.procs):
            if name.startswith("worker-") and proc.poll() is not None:
                log.warning(f"{name} exited with code {proc.returncode}; restarting it")
                self.procs.remove((name, proc))
                self.start_worker(int(name.split("-")[1]))
            if name.startswith("supernode") and proc.poll() is not None:
                lines = [
                    ln
                    for ln in self.log_of(name).splitlines()
                    if "ERROR" in ln or "SSL" in ln or "could not" in ln
                ]
                link = [
                    ln
                    for ln in self.log_of("superlink").splitlines()
                    if "ERROR" in ln and ("public key" in ln or "SSL" in ln)
                ]
                raise DeployError(
                    f"{name} exited with code {proc.returncode}: "
                    + " | ".join(lines[-3:] + [ln[-160:] for ln in link[-1:]])
                )

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink."""
        for _, proc in sorted(self.procs, key=lambda p: p[0] == "superlink"):
            stop_group(proc)
        self.procs.clear()
        if self.sockets:
            shutil.rmtree(self.sockets, ignore_errors=True)

    # -- runs: through the `flwr` CLI ----------------------------------------------------
    def submit(self, cfg: C.Config) -> int:
        return self.conn.submit(cfg)

    def status(self, run_id: int) -> dict:
        return self.conn.status(run_id)

    def serverapp_running(self) -> bool | None:
        """Whether a ServerApp process runs under the SuperLink (None: no /proc to tell)."""
        links = [p for name, p in self.procs if name == "superlink"]
        if not links or not Path("/proc/self/stat").exists():
            return None
        return any(b"flwr-serverapp" in cmdline(pid) for pid in descendants(links[0].pid))

    def wait(self, run_id: int, run_dir: Path, timeout: float) -> dict:
        """Poll until the run finishes, logging each new metrics line as progress.

        `flwr ls` is a fresh Python process (~2 CPU-s of Flower's imports): asked every poll
        it took half a core from the clients and the server's evaluation. So it is asked
        only when the run looks finished (summary.json written, the ServerApp process gone)
        and otherwise every `status_every_s`, which also catches a ServerApp that never
        started."""
        deadline, seen, info, asked, started = time.time() + timeout, 0, {}, 0.0, False
        while time.time() < deadline:
            self.check_nodes()
            rows = read_metrics(run_dir)
            for row in rows[seen:]:
                log.info(
                    f"round {row['round']}: eval_loss "
                    f"{row.get('eval_loss', float('nan')):.4f}"
                    + (f" train_loss {row['train_loss']:.4f}" if row.get("train_loss") else "")
                )
            seen = len(rows)
            running = self.serverapp_running()
            started = started or bool(running)
            ended = (run_dir / "summary.json").exists() or (started and running is False)
            if ended or time.time() - asked >= self.status_every_s:
                info, asked = self.status(run_id), time.time()
                if str(info.get("status", "")).startswith("finished"):
                    return info
            time.sleep(self.poll_s)
        raise DeployError(
            f"run {run_id} did not finish within {timeout:.0f} s (last status {info.get('status')})"
        )


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def fit_threads(cfg: C.Config) -> C.Config:
    """All SuperNodes on this one machine train at once: oversubscribed torch threads slow
    training down many times over, so each gets cores // clients. (Training them one at a
    time on every core, as simulation's one actor does, measured slower: Flower's own
    processes and each round's ClientApp starts share those cores and stall a step.)"""
    cores, fed = os.cpu_count() or 1, cfg.federation
    if fed.num_clients * max(fed.client_threads, 1) <= cores:
        return cfg
    threads = max(1, cores // fed.num_clients)
    log.info(
        f"{fed.num_clients} local SuperNodes x {fed.client_threads} threads > "
        f"{cores} cores: using federation.client_threads={threads}"
    )
    return dataclasses.replace(cfg, federation=dataclasses.replace(fed, client_threads=threads))


def deploy_local(
    cfg: C.Config,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 3600,
    workers: bool = True,
) -> dict:
    """Run `cfg` on a local SuperLink + `federation.num_clients` SuperNodes; return summary."""
    prepare(cfg)  # convert offline weights once, check data, before any process starts
    cfg = fit_threads(cfg)
    run_dir = Path(cfg.output.dir)
    if not cfg.output.resume:
        clear_old_run(run_dir, cfg.output.overwrite)  # before deployment/ is written into it
    work = run_dir / "deployment"
    n = cfg.federation.num_clients
    with LocalDeployment(work, n, tls=tls, auth=auth, workers=workers) as dep:
        log.info(
            f"SuperLink on 127.0.0.1:{dep.port} ({'TLS' if dep.tls else 'insecure'}"
            f"{', SuperNode auth' if auth else ''}), {dep.n} SuperNodes"
            f"{' with a fedtune worker each' if workers else ''}; logs in {work}"
        )
        run_id = dep.submit(cfg)
        log.info(f"submitted run {run_id}")
        info = dep.wait(run_id, run_dir, timeout)
    if info.get("status") != "finished:completed":
        raise DeployError(
            f"run {run_id} ended as {info.get('status')}: "
            f"{info.get('status-details')}; see {work}/superlink.log"
        )
    return json.loads((run_dir / "summary.json").read_text())
