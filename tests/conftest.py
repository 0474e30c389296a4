"""Shared test fixtures. Multi-process tests go through :func:`tests.distributed.run_distributed`.

In CI (``CI=true``) or with ``FISHERDIST_REQUIRE_ALL=1`` a skipped test is reported as a failure: the
tests that need Slurm, mpiexec or another optional tool may skip on a laptop, but CI installs all of
them, so a skip there means a test that should have run did not.
"""

import os

import pytest

# fixtures shared by the launcher tests: the toy job's single-process reference and the local Slurm cluster
pytest_plugins = ["tests.launch_helpers", "tests.slurm_cluster"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def require_all() -> bool:
    """Whether every test must run (CI, or asked for explicitly)."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return ci or os.environ.get("FISHERDIST_REQUIRE_ALL", "") == "1"


def _skip_reason(longrepr: object) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason"); keep just the reason.
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_if_skipped(report: pytest.TestReport | pytest.CollectReport) -> None:
    if require_all() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (CI / FISHERDIST_REQUIRE_ALL=1): {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_if_skipped(outcome.get_result())


def pytest_configure(config: pytest.Config) -> None:
    if require_all():  # a module that skipped at import becomes an error; still run all the others
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Each test starts from the same environment and no cached distributed state: a test that runs a
    command in-process (``init_distributed`` exports RANK / MASTER_PORT / ... for its children, libraries
    such as accelerate set their own) must not make later tests launch as if inside torchrun."""
    saved = dict(os.environ)
    yield
    import torch.distributed as dist

    from fisherdist.distributed import env

    if dist.is_initialized():
        dist.destroy_process_group()
    env._current, env._owns_group = None, False
    os.environ.clear()
    os.environ.update(saved)
