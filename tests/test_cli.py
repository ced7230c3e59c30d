import subprocess
import sys

from fastsae.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cpp", "eager"):
        assert name in out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastsae", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "eager" in r.stdout
