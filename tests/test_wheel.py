"""A non-editable install works: the wheel, installed into a fresh venv, runs from another
folder with its shipped configs (a user's `pip install vidpipe`, not the checkout)."""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_sources(target: Path) -> Path:
    """The files the wheel is built from (pyproject's package folders, pyproject, README),
    copied so that building writes nothing into the shared checkout."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in set(project["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / folder, target / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(REPO / name, target / name)
    return target


def _venv_reusing_dependencies(venv: Path) -> Path:
    """A venv without vidpipe whose interpreter also sees this interpreter's site-packages
    (torch & co., wherever they are installed). A .pth line adds a folder to sys.path but
    runs no .pth file inside it, so the checkout's editable-install hook stays out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a venv holding the built wheel, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    sources = _copy_sources(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(root / "dist"), str(sources)], check=True)
    (wheel,) = (root / "dist").glob("vidpipe-*.whl")
    bin_dir = _venv_reusing_dependencies(root / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install",
                    "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, work


def _run(installed, *argv: str) -> subprocess.CompletedProcess:
    bin_dir, work = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=work, env=env,
                          capture_output=True, text=True, timeout=240)


def test_the_installed_package_and_its_configs_are_used(installed):
    bin_dir, _ = installed
    run = _run(installed, "python", "-c", "import vidpipe; print(vidpipe.__file__); "
               "from vidpipe.core.config import resolve_config_path; "
               "print(resolve_config_path('malt_thumos'))")
    assert run.returncode == 0, run.stderr
    module, config = map(Path, run.stdout.splitlines())
    for path in (module, config):
        assert path.is_relative_to(bin_dir.parent) and not path.is_relative_to(REPO)
    assert config.name == "malt_thumos.yaml"
    help_run = _run(installed, "vidpipe", "train", "--config", "malt_thumos", "--help")
    assert help_run.returncode == 0 and "--config" in help_run.stdout, help_run.stderr


def test_a_tiny_demo(installed):
    _, work = installed
    run = _run(installed, "vidpipe", "demo", "--out", "demo", "--videos", "2",
               "--duration", "10", "--epochs", "1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "per-frame mAP on held-out videos" in run.stdout
    assert (work / "demo" / "demo_summary.json").is_file()
