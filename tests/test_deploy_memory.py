"""The pod's memory limit covers what the server it runs may take: the deployment's own sum.

Every runtime instance of a dense twin may run one pass, or one batch of several requests'
passes, of up to ``--dense-memory-bytes`` at once, in each worker; on top of that the server
holds its idle footprint. Each overlay's rendered Deployment is held to
``workers x dense-twin instances x dense budget + workers x idle``, with the workers and the
budget read from the manifest, the dense twins and their instances from the repository the pod
serves (the demo repository, which the image carries and the init container copies), and the
idle footprint measured on a real server started with the manifest's batching settings.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from model_format import DENSE_FILE
from scripts.server_readings import rss_bytes
from service import BUNDLED_REPOSITORY
from service.core.settings import Settings
from service.engine.model_config import load_model_config
from service.engine.model_loader import versions_on_disk
from service.tools.server_process import ServerProcess
from tests.test_deploy import OVERLAYS, container, env_of, pod, render

UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}

SHAPING = ("CONVSERVE_MAX_BATCH_SIZE", "CONVSERVE_PREFERRED_BATCH_SIZE", "CONVSERVE_INSTANCES")
"""The manifest's settings that change what a ready server holds (warm-up sizes, sessions)."""


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (``2560Mi``, ``4Gi``, ``512M``, ``1073741824``)."""
    match = re.fullmatch(r"(\d+)([kMG]i?)?", text)
    assert match, f"unexpected memory quantity {text!r}"
    return int(match.group(1)) * UNITS[match.group(2) or ""]


def setting(main: dict[str, Any], name: str) -> str | None:
    """A setting as the container gives it: ``--flag value`` in its args, or the variable."""
    flag = "--" + name.removeprefix("CONVSERVE_").lower().replace("_", "-")
    args = [str(a) for a in main.get("args", [])]
    if flag in args[:-1]:
        return args[args.index(flag) + 1]
    return env_of(main).get(name)


def dense_instances(instances: int) -> int:
    """Runtime instances of the demo repository's dense twins, all served versions together."""
    defaults = Settings(instances=instances)
    total = 0
    for folder in sorted(p for p in BUNDLED_REPOSITORY.iterdir() if p.is_dir()):
        config = load_model_config(folder / "config.json", defaults)
        served = config.versions.select(versions_on_disk(folder))
        twins = sum((folder / str(v) / DENSE_FILE).is_file() for v in served)
        total += twins * config.instances
    return total


@pytest.fixture(scope="module")
def idle_bytes() -> int:
    """Resident memory of one ready server with the demo repository and the cpu overlay's
    batching settings, on the CPU."""
    main = container(render("cpu"))
    shaping = {name: value for name in SHAPING if (value := setting(main, name)) is not None}
    with ServerProcess(BUNDLED_REPOSITORY, "--device", "cpu", env=shaping) as server:
        assert server.process is not None
        time.sleep(1)  # whatever the startup left to settle
        return rss_bytes(server.process.pid)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_memory_limit_covers_every_dense_instance_and_the_idle_server(
    overlay: str, idle_bytes: int
) -> None:
    objects = render(overlay)
    main = container(objects)
    # The pod serves the demo repository the image carries (see the module docstring).
    [copier] = pod(objects)["initContainers"]
    assert "/opt/convserve-demo-models/." in copier["command"]
    budget = setting(main, "CONVSERVE_DENSE_MEMORY_BYTES")
    assert budget is not None, "set --dense-memory-bytes explicitly: the limit is computed from it"
    defaults = Settings()
    workers = int(setting(main, "CONVSERVE_WORKERS") or defaults.workers)
    instances = dense_instances(int(setting(main, "CONVSERVE_INSTANCES") or defaults.instances))
    assert instances >= 1  # the demo repository has dense twins: the sum is not empty
    limit = quantity(main["resources"]["limits"]["memory"])
    needed = workers * (instances * int(budget) + idle_bytes)
    assert limit >= needed, (
        f"{overlay}: memory limit {limit} < {workers} worker(s) x ({instances} dense-twin "
        f"instance(s) x {budget} + idle {idle_bytes}) = {needed}"
    )
    assert quantity(main["resources"]["requests"]["memory"]) <= limit
