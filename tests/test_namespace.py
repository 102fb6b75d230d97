"""The repo's platform/ folder must never shadow the standard library's `platform` module.

It is a namespace portion mapped to `moeforge.platform` (no __init__.py), so with the repo root on
sys.path -- `python -c` from the root, `python -m pytest`, a Ray worker whose working_dir is the
repo -- `import platform` still finds the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

PROBE = "import platform, sys; print(platform.system(), platform.__file__)"


def test_no_init_in_top_level_code_folders():
    for folder in ("platform", "model", "kernels", "jobs"):
        assert not os.path.exists(os.path.join(REPO_ROOT, folder, "__init__.py")), folder


def test_stdlib_platform_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "Linux"
    assert not out[1].startswith(REPO_ROOT), out[1]
    # and the project's own platform package imports under its namespace
    subprocess.run(
        [sys.executable, "-c", "import moeforge.platform.config, moeforge.model.config"],
        cwd=REPO_ROOT,
        check=True,
    )


RAY_DRIVER = """
import json, os, sys, ray
ray.init(address=sys.argv[1], runtime_env={"working_dir": sys.argv[2], "excludes": [".venv", ".git", "runs"]})

@ray.remote
def probe():
    import os, platform
    import moeforge.model.config  # the project still resolves in the worker
    return [platform.system(), platform.__file__, os.getcwd(), os.path.isdir("platform")]

print("RESULT " + json.dumps(ray.get(probe.remote(), timeout=180)))
"""


def test_stdlib_platform_inside_ray_worker_with_repo_working_dir(ray_cluster, tmp_path):
    # A working_dir upload is a job-level option, so a second driver joins the session cluster.
    address = ray_cluster.get_runtime_context().gcs_address
    driver = tmp_path / "driver.py"
    driver.write_text(RAY_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), address, REPO_ROOT],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    system, path, cwd, has_platform_dir = json.loads(lines[0][len("RESULT "):])
    assert has_platform_dir, f"the worker's cwd {cwd} should be the uploaded repo"
    assert system == "Linux"
    assert not path.startswith(cwd), f"platform resolved to the repo copy: {path}"


def test_every_code_folder_is_a_listed_package():
    """A wheel holds only the packages pyproject.toml lists: a new room left out would import in an
    editable install and be missing from a built one."""
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    expected = set()
    for top in ("platform", "model", "kernels", "jobs", "conf"):
        for folder, dirs, files in os.walk(os.path.join(REPO_ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(name.endswith(".py") for name in files):
                rel = os.path.relpath(folder, REPO_ROOT).split(os.sep)
                expected.add(".".join(["moeforge", *rel]))
    assert expected - listed == set(), f"pyproject.toml [tool.setuptools] packages misses {expected - listed}"


def test_platform_root_keeps_a_handful_of_modules():
    """platform/ is rooms: new code lands in a sub-package whose name says what it owns."""
    root = os.path.join(REPO_ROOT, "platform")
    modules = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    assert len(modules) <= 4, modules
