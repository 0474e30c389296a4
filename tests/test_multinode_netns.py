"""Two "nodes" on this machine: two network namespaces joined by a veth pair, each with its own private
address, one torchrun agent per namespace (c10d rendezvous on node A), the toy FSDP2 run with its sharded
Fisher-like statistic. The result must equal the single-process run. All traffic stays inside the two
namespaces this test creates; they (and the veth pair) are deleted in a ``finally``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, STEPS, TOY, assert_same_result, job_env, load_result


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def two_nodes() -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """((namespace, veth, address) of node A, same of node B)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (`ip netns`) to create network namespaces")
    tag = os.getpid() % 100000
    subnet = f"10.{200 + tag % 50}.{tag % 250}"
    a, b = (f"fdA{tag}", f"fdva{tag}", f"{subnet}.1"), (f"fdB{tag}", f"fdvb{tag}", f"{subnet}.2")
    try:
        for ns, _, _ in (a, b):
            _ip("netns", "add", ns)
        _ip("link", "add", a[1], "netns", a[0], "type", "veth", "peer", "name", b[1], "netns", b[0])
        for ns, veth, addr in (a, b):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns, _, _ in (a, b):
            _ip("netns", "del", ns, check=False)
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        yield a, b
    finally:
        for ns, _, _ in (a, b):  # deleting a namespace also deletes its end of the veth pair
            _ip("netns", "del", ns, check=False)


@pytest.mark.timeout(150)
def test_two_namespace_nodes_match_single_process(two_nodes, tmp_path: Path, toy_reference: dict) -> None:
    (ns_a, veth_a, addr_a), (ns_b, veth_b, addr_b) = two_nodes
    procs = []
    for ns, veth, addr, host in ((ns_a, veth_a, addr_a, True), (ns_b, veth_b, addr_b, False)):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "fisherdist.distributed.preempt", "torchrun",
               "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{addr_a}:29410",
               "--rdzv_id", "fd-netns", "--local_addr", addr, "--max_restarts", "0",
               *(["--rdzv_conf", "is_host=1"] if host else []), "-m", TOY, "--out", str(tmp_path), "--steps", str(STEPS),
               "--ckpt-every", "3"]  # fmt: skip
        env = job_env(GLOO_SOCKET_IFNAME=veth)
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    result = load_result(tmp_path)
    assert result["world"] == 2
    assert_same_result(result, toy_reference)
    assert _ip("netns", "list").stdout.count(ns_a) == 1  # still there until the fixture's finally
