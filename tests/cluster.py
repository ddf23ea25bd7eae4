"""Real worker processes on 127.0.0.1 for the multi-worker tests.

`run_cluster` starts one process per worker, each with its own TF_CONFIG,
and waits for all of them with a deadline: a worker that fails makes the
others stop (they would wait for it forever), and a cluster that overruns
is killed. Ports are chosen free, but another process may take one before
the worker binds it (TensorFlow's server cannot share a port, so it cannot
be held for it): a cluster whose worker reports its port taken is started
again on new ports.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a worker prints when another process took its port in the meantime.
PORT_TAKEN = ("Address already in use", "Could not start gRPC server", "Failed to add port")
# Seconds a failed cluster's other workers get to report their own error.
_GRACE = 20


def free_ports(count):
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    """The TF_CONFIG of worker `index` of a cluster on `ports` of 127.0.0.1."""
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


class Cluster:
    """The worker processes of one cluster, each logging to its own file.

    Args:
        commands: one argument list per worker (run with this Python, in
            the repository root).
        log_dir: where `worker<i>.log` files go.
        env: extra environment variables for every worker.
    """

    def __init__(self, commands, log_dir, env=None):
        self.ports = free_ports(len(commands))
        self.logs = [os.path.join(log_dir, f"worker{i}.log") for i in range(len(commands))]
        self.processes = []
        base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
        base.update(env or {})
        for index, command in enumerate(commands):
            worker_env = dict(base, TF_CONFIG=tf_config(self.ports, index))
            with open(self.logs[index], "w") as log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, *command], env=worker_env, cwd=ROOT, stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def kill(self, index):
        """SIGKILLs worker `index` (no cleanup: like a machine that dies)."""
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait(timeout=60)

    def wait(self, timeout, grace=_GRACE):
        """Waits for every worker; returns `[(returncode, output), ...]`.

        A worker that fails gives the others `grace` seconds to fail too
        (with their own message), then they are killed (return code -9).
        Raises AssertionError after `timeout` seconds, with every log.
        """
        deadline = time.monotonic() + timeout
        failed_at = None
        try:
            while any(p.poll() is None for p in self.processes):
                now = time.monotonic()
                if failed_at is None and any(p.poll() for p in self.processes):
                    failed_at = now
                if failed_at is not None and now > failed_at + grace:
                    break
                if now > deadline:
                    raise AssertionError(
                        f"the workers did not finish in {timeout} s:\n{self.outputs_text()}"
                    )
                time.sleep(0.2)
        finally:
            self.stop()
        return [(p.returncode, self.output(i)) for i, p in enumerate(self.processes)]

    def stop(self):
        """Kills every worker still running."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)

    def output(self, index):
        with open(self.logs[index], errors="replace") as log:
            return log.read()

    def outputs_text(self, tail=4000):
        return "\n".join(
            f"--- worker {i} ---\n{self.output(i)[-tail:]}" for i in range(len(self.processes))
        )

    def port_was_taken(self):
        """Whether a worker failed because another process had its port."""
        return any(
            p.returncode and any(m in self.output(i) for m in PORT_TAKEN)
            for i, p in enumerate(self.processes)
        )


def run_cluster(commands, log_dir, timeout, env=None, attempts=3):
    """Runs a cluster to the end; returns its `[(returncode, output), ...]`.

    Retries on new ports when a worker's port was taken; asserts that every
    worker exited with status 0.
    """
    for _ in range(attempts):
        cluster = Cluster(commands, log_dir, env)
        results = cluster.wait(timeout)
        if not cluster.port_was_taken():
            break
    for index, (code, output) in enumerate(results):
        assert code == 0, f"worker {index} failed ({code}):\n{cluster.outputs_text()}"
    return results
