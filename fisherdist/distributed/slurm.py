"""Render the sbatch templates in ``slurm/`` for a job size and submit them.

The templates stay ordinary, hand-editable sbatch scripts; rendering only rewrites their ``#SBATCH``
lines (nodes, GPUs and tasks per node, CPUs, time, partition, job name) and the ``NPROC_PER_NODE=`` line,
so ``fisherdist slurm submit --dry-run`` shows exactly what ``sbatch slurm/<template>.sbatch`` would run.

``python -m fisherdist.distributed.slurm hostfile NODELIST SLOTS`` and ``... script-path MODULE`` are small
helpers the DeepSpeed template calls (kept in Python so the shell stays thin).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fisherdist.distributed.hostlist import expand_nodelist
from fisherdist.errors import FisherdistError

TEMPLATES = ("torchrun", "deepspeed", "srun")
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
#: templates that start one Slurm task per node (torchrun spawns the per-GPU workers itself)
ONE_TASK_PER_NODE = ("torchrun",)


@dataclass(frozen=True)
class JobShape:
    """What ``fisherdist slurm submit`` can set; ``None`` keeps the template's line."""

    nodes: int
    gpus_per_node: int
    procs_per_node: int | None = None  # processes per node; defaults to gpus_per_node (CPU jobs: give it)
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    job_name: str | None = None

    @property
    def procs(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else max(1, self.gpus_per_node)


def template_path(name: str, directory: Path | None = None) -> Path:
    if name not in TEMPLATES:
        raise FisherdistError(f"--template {name!r}: expected one of {', '.join(TEMPLATES)}")
    path = (directory or TEMPLATE_DIR) / f"{name}.sbatch"
    if not path.is_file():
        raise FisherdistError(f"{path}: Slurm template not found (set --template-dir to the repository's slurm/)")
    return path


def _set_sbatch(text: str, key: str, value: str | None) -> str:
    """Set ``#SBATCH --key=value`` (uncommenting ``##SBATCH``), comment it out for value ``""``, or keep."""
    if value is None:
        return text
    pattern = re.compile(rf"^#{{1,2}}SBATCH --{re.escape(key)}=.*$", re.M)
    line = f"#SBATCH --{key}={value}" if value != "" else f"##SBATCH --{key}= (not requested)"
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    if value == "":
        return text
    last = list(re.finditer(r"^#{1,2}SBATCH .*$", text, re.M))[-1]
    return text[: last.end()] + "\n" + line + text[last.end() :]


def render(template: str, shape: JobShape, directory: Path | None = None) -> str:
    """The template text with the job shape applied."""
    if shape.nodes < 1 or shape.gpus_per_node < 0 or shape.procs < 1:
        raise FisherdistError(f"job shape: --nodes {shape.nodes} must be >= 1, --gpus-per-node {shape.gpus_per_node} >= 0, "
                              f"processes per node {shape.procs} >= 1")  # fmt: skip
    text = template_path(template, directory).read_text()
    tasks = 1 if template in ONE_TASK_PER_NODE else shape.procs
    text = _set_sbatch(text, "nodes", str(shape.nodes))
    text = _set_sbatch(text, "ntasks-per-node", str(tasks))
    text = _set_sbatch(text, "gpus-per-node", str(shape.gpus_per_node) if shape.gpus_per_node else "")
    text = _set_sbatch(text, "cpus-per-task", None if shape.cpus_per_task is None else str(shape.cpus_per_task))
    text = _set_sbatch(text, "time", shape.time)
    text = _set_sbatch(text, "partition", shape.partition)
    text = _set_sbatch(text, "job-name", shape.job_name)
    return re.sub(r"^NPROC_PER_NODE=\S+", f"NPROC_PER_NODE={shape.procs}", text, count=1, flags=re.M)


def submit(script: str, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> str:
    """Write the rendered script under ``workdir/.fisherdist-slurm/`` and ``sbatch`` it; return the job id."""
    if shutil.which("sbatch") is None:
        raise FisherdistError("sbatch not found on PATH (run on a Slurm login node, or use --dry-run)")
    folder = workdir / ".fisherdist-slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.sbatch"
    path.write_text(script)
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", str(path), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise FisherdistError(f"sbatch {path} failed (exit {result.returncode}): {lines[-1]}")
    return result.stdout.strip().split(";")[0]


def hostfile(nodelist: str, slots: int) -> str:
    """DeepSpeed hostfile lines ``<node> slots=<n>`` for every node of a Slurm node list."""
    return "".join(f"{host} slots={slots}\n" for host in expand_nodelist(nodelist))


def script_path(module: str) -> str:
    """A file that runs ``python -m module`` when run as a script (DeepSpeed's slurm runner takes paths).

    For ``fisherdist`` this is the console script: running ``fisherdist/__main__.py`` directly would put the
    package directory first on ``sys.path`` and let its subpackages (``data``, ``config``) shadow others."""
    if module == "fisherdist" and shutil.which("fisherdist"):
        return str(shutil.which("fisherdist"))
    for name in (f"{module}.__main__", module):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin and spec.origin.endswith(".py") and not spec.origin.endswith("__init__.py"):
            return spec.origin
    raise FisherdistError(f"module {module!r}: no runnable file (__main__.py or a module file) found")


def _main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "hostfile":
            sys.stdout.write(hostfile(argv[1], int(argv[2])))
        elif len(argv) == 2 and argv[0] == "script-path":
            print(script_path(argv[1]))
        else:
            print("usage: python -m fisherdist.distributed.slurm hostfile NODELIST SLOTS | script-path MODULE", file=sys.stderr)
            return 2
    except FisherdistError as e:
        print(f"fisherdist: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
