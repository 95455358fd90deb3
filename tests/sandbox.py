"""Throwaway machines for tests, on loopback only: network namespaces, SSH hosts, PostgreSQL.

A test that binds a server to 0.0.0.0 or starts a Ray cluster does it inside a network
namespace it made itself: there every listener is reachable only from that namespace, and Ray
(which otherwise picks this machine's outward address) uses 127.0.0.1. Each SSH host (one
loopback address, one "machine") also lives in its own PID and mount namespaces: its processes
(sshd, Ray, trials) see only each other, so `ray stop`, which Ray runs on `ray up` and
`ray down` and which kills every Ray process it sees by name, touches no other host's Ray and
no one else's; there root's home folder is a temporary one (a copy of /etc/passwd mounted over
it says so), so nothing it writes to ~ lands in the real /root. Each thing is ended by its PID:
killing an SSH host's first process ends every process in it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000


def require_root_tools(*tools: str) -> None:
    """Fail with the one fix when a prerequisite is missing (`./dev.sh test` installs them)."""
    import pytest

    if os.geteuid() != 0:
        pytest.fail("this test makes network namespaces and needs root")
    missing = [t for t in tools if not (shutil.which(t) or Path(t).is_file())]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}; `./dev.sh test` installs them (apt-get install "
                    "openssh-server postgresql)")


def end(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal a process we started, then SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `ready()` until it returns something truthy; fail with the log if it never does."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text()[-4000:] if log and log.is_file() else ""
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{tail}")


class Namespace:
    """A network namespace holding only `lo`; `outward`, if given, is one more address on `lo`, with
    the default route through it, standing for a machine's outward address."""

    def __init__(self, outward: str | None = None):
        self.name = f"skinclr-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run("ip", "link", "set", "lo", "up")
            if outward:
                self.run("ip", "addr", "add", f"{outward}/32", "dev", "lo")
                self.run("ip", "route", "add", "default", "dev", "lo", "src", outward)
        except BaseException:
            self.remove()
            raise

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*argv), check=True, **kw)

    @contextmanager
    def entered(self):
        """This thread's new sockets open inside the namespace (MLflow clients, HTTP checks)."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test namespace")
            yield
        finally:
            libc.setns(home, CLONE_NEWNET)
            os.close(home)
            os.close(target)

    def free_port(self) -> int:
        with self.entered(), socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


class SSHHost:
    """One machine: sshd on port 22 of `address` in `ns`, in its own PID and mount namespaces, with
    root's home folder `self.home`; logins only with `key` (made here if not given). Two hosts in
    one namespace reach each other like two machines on a network, and share the file system."""

    def __init__(self, ns: Namespace, folder: Path, address: str, key: Path | None = None):
        self.ns, self.folder, self.address = ns, folder, address
        self.home = folder / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.home.chmod(0o700)
        self.key = key or folder / "id_ed25519"
        for made in ([] if key else [self.key]) + [folder / "host_key"]:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(made)], check=True)
        shutil.copyfile(f"{self.key}.pub", self.home / ".ssh" / "authorized_keys")
        config = folder / "sshd_config"
        config.write_text("\n".join([
            "Port 22", f"ListenAddress {address}", f"HostKey {folder / 'host_key'}",
            f"PidFile {folder / 'sshd.pid'}", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "AuthorizedKeysFile .ssh/authorized_keys",
            "MaxStartups 50", "MaxSessions 50"]) + "\n")
        passwd = folder / "passwd"
        passwd.write_text("".join(f"root:x:0:0:root:{self.home}:/bin/bash\n" if line.startswith("root:") else line
                                  for line in open("/etc/passwd")))
        # /run/sshd is sshd's privilege-separation folder: a private /run provides it
        setup = (f"mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && mount --bind {passwd} /etc/passwd && "
                 f"exec /usr/sbin/sshd -D -e -f {config}")
        self.log = folder / "sshd.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ns.cmd("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                       "sh", "-c", setup), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(f"sshd on {address}", lambda: "Server listening" in self.log.read_text(), 20, self.proc, self.log)
            self.pid_ns = wait_for("the SSH host's PID namespace", self._pid_ns, 10)
        except BaseException:
            self.close()
            raise

    def _pid_ns(self) -> str | None:
        for pid in children(self.proc.pid):
            try:
                return os.readlink(f"/proc/{pid}/ns/pid")
            except OSError:
                pass
        return None

    def ssh(self, command: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.ns.cmd("ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                                          "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                                          "-o", "LogLevel=ERROR", f"root@{self.address}", command), **kw)

    def processes(self, *words: str) -> list[int]:
        """PIDs (as this machine sees them) of the host's processes whose command line holds every word."""
        found = []
        for entry in glob.glob("/proc/[0-9]*"):
            pid = int(entry.rsplit("/", 1)[1])
            try:
                if os.readlink(f"{entry}/ns/pid") != self.pid_ns:
                    continue
            except OSError:
                continue
            if all(w in cmdline(pid) for w in words):
                found.append(pid)
        return found

    def close(self) -> None:
        end(self.proc, signal.SIGKILL)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def exe(pid: int) -> str:
    """The program's file name; '' once the process is gone."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        import pytest

        pytest.fail(f"PostgreSQL's {name} not found; `./dev.sh test` installs Debian's postgresql")
    return found


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1:`port` in `ns`: initdb as the `postgres` user
    (it refuses root) into a temporary folder, trust logins, fsync off."""

    def __init__(self, ns: Namespace):
        self.folder = Path(tempfile.mkdtemp(prefix="skinclr-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
        data = self.folder / "data"
        subprocess.run([*as_postgres, postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        self.port = ns.free_port()
        self.log = self.folder / "postgres.log"
        out = open(self.log, "w")
        os.chown(self.log, user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            ns.cmd(*as_postgres, postgres_bin("postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder),
                   "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
                   "-c", "synchronous_commit=off", "-c", "max_connections=200"),
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        try:
            wait_for("PostgreSQL", lambda: "ready to accept connections" in self.log.read_text(), 30, self.proc, self.log)
        except BaseException:
            self.close()
            raise
        self.uri = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        end(self.proc, signal.SIGQUIT)  # immediate shutdown: the data is thrown away
        shutil.rmtree(self.folder, ignore_errors=True)


class TrackingServer:
    """`skinclr server` in `ns` on a loopback port: stop() and start() again keep the port and the store."""

    def __init__(self, ns: Namespace, log: Path, *args: str, host: str = "127.0.0.1", env: dict | None = None):
        self.ns, self.log, self.args, self.host = ns, log, args, host
        self.env = {**os.environ, "MLFLOW_WORKERS": "2", **(env or {})}
        self.port = ns.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "TrackingServer":
        import sys

        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                self.ns.cmd(sys.executable, "-m", "skinclr.cli.main", "server", "--host", self.host, "--port", str(self.port),
                            *self.args), cwd=Path(__file__).resolve().parents[1], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"tracking server {self.url}", lambda: self.answers("/health"), timeout, self.proc, self.log)
        return self

    def answers(self, path: str, host_header: str | None = None, base: str | None = None) -> int | None:
        """The HTTP status of GET `path` (on `base`, default the loopback URL) from inside the
        namespace; None when nothing answers."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{base or self.url}{path}", headers={"Host": host_header} if host_header else {})
        with self.ns.entered():
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code
            except OSError:
                return None

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; the whole process group is killed if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlived their launcher
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
