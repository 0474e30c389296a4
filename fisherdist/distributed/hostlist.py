"""Slurm's compressed host and task-count lists, read without a running Slurm.

``SLURM_JOB_NODELIST`` (``node[01-04],gpu7``) names the head node that hosts the rendezvous; every task
must derive the same one on its own. ``scontrol show hostnames`` is the reference where it works; the
parser covers machines without Slurm tools (and is checked against scontrol in the tests).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from fisherdist.errors import FisherdistError


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise FisherdistError(f"node list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise FisherdistError(f"node list {text!r}: unbalanced brackets")
    return parts + [text[start:]]


def _expand_host(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    prefix, rest = item[: m.start()], _expand_host(item[m.end() :], whole)
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise FisherdistError(f"node list {whole!r}: cannot read range {part!r}")
        values = [lo] if not sep else [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        out += [prefix + v + tail for v in values for tail in rest]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``node[01-04],gpu7``, ``r[1-2]-n[1,3]``) in Slurm's own order."""
    return [h for item in _split_top_level(nodelist) if item for h in _expand_host(item, nodelist)]


def head_node(nodelist: str) -> str:
    """First host of a node list: ``scontrol show hostnames`` when it works here, else our own parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise FisherdistError(f"node list {nodelist!r} names no host")
    return hosts[0]


def tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` format: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise FisherdistError(f"tasks per node {spec!r}: expected e.g. '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts
