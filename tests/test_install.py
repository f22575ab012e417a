"""The installed package: the top-level kernels/ folder is `layerif_jax.kernels` (a namespace), whatever
else is on the path. transformers >= 5.25 installs Hugging Face's own top-level
`kernels` package; when ours was the top-level `kernels` too, the library imported
theirs outside the repository root (AttributeError: module 'kernels' has no attribute
'resolve' on the first forward) and a wheel would have shared site-packages/kernels."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_import_as_part_of_the_library_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("from layerif_jax.kernels import switch\n"
            "from layerif_jax.models import decoder\n"
            "assert decoder.switch is switch and callable(switch.resolve)\n"
            "print(switch.__file__)")
    got = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    where = Path(got.stdout.strip().splitlines()[-1])
    assert where.name == "switch.py" and (where.parent / "segment_grads").is_dir()


def test_the_repository_root_does_not_shadow_other_kernels_packages(tmp_path):
    """From the repository root (where `python -m pytest` runs) `import kernels` is not
    our folder: it has no __init__.py, so a regular `kernels` package elsewhere on the
    path wins; with none installed it is an empty namespace."""
    got = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    if got.returncode == 0 and got.stdout.strip() != "None":
        assert Path(got.stdout.strip()).parent != ROOT / "kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_the_wheel_holds_the_kernels_under_the_library(tmp_path):
    pytest.importorskip("setuptools")   # --no-build-isolation: no download
    src = tmp_path / "src"   # a copy: building in place would write build/ into the checkout
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("layerif_jax", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip, symlinks=True)   # the link kept
    got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top, "a top-level kernels package would collide with Hugging Face's"
    for f in ("layerif_jax/kernels/switch.py", "layerif_jax/kernels/segment_grads/tpu.py",
              "layerif_jax/kernels/segment_attention/reference.py",
              "layerif_jax/assets/gpu/h200.txtpb"):
        assert f in names, f
