"""The Lambda layer build (infra/Makefile, what `sam build` runs): a manylinux wheel of vhdcore that imports in a
clean virtual environment, and the handlers' dependencies for Lambda's Python 3.12."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_layer_holds_a_manylinux_vhdcore_that_imports_in_a_clean_venv(tmp_path: Path) -> None:
    artifacts = tmp_path / "layer"
    build = ["make", "-C", str(REPO / "infra"), "build-VhdcoreLayer", f"ARTIFACTS_DIR={artifacts}"]
    subprocess.run([*build, f"PYTHON={sys.executable}"], check=True, capture_output=True, timeout=1800)
    wheels = list((REPO / "infra" / "dist").glob("*.whl"))
    assert len(wheels) == 1
    tags = wheels[0].name.removesuffix(".whl").split("-")[-1]
    assert "manylinux2014_x86_64" in tags.split(".") and wheels[0].name.split("-")[-2] == "abi3"
    with zipfile.ZipFile(wheels[0]) as wheel:
        native = [n for n in wheel.namelist() if n.startswith("vhdcore/_vhdcore") and n.endswith(".so")]
    assert native == ["vhdcore/_vhdcore.abi3.so"]

    venv = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--no-deps", wheels[0]], check=True, timeout=300)
    probe = (
        "import vhdcore, sys; "
        "vhdcore.create(sys.argv[1], 4 << 20); vhdcore.write(sys.argv[1], 512, b'layer' * 100); "
        "print(vhdcore.open_chain(sys.argv[1]).read(512, 500).decode())"
    )
    disk = tmp_path / "probe.vhd"
    result = subprocess.run([venv / "bin" / "python", "-c", probe, disk], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "layer" * 100

    # Lambda's runtime finds the layer under python/: vhdcore and the handlers' dependencies built for cp312.
    layer = artifacts / "python"
    assert (layer / "vhdcore" / "_vhdcore.abi3.so").is_file()
    for package in ("aws_lambda_powertools", "pydantic", "boto3", "crc32c"):
        assert (layer / package).is_dir(), package
    assert list((layer / "pydantic_core").glob("_pydantic_core.cpython-312-*.so"))
