"""serving never imports torch, and the committed generated code matches protos/."""

from __future__ import annotations

import filecmp
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import serving

REPO = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import importlib, pkgutil, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: serving must not import it")
        return None
sys.meta_path.insert(0, BlockTorch())
import serving
names = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
for name in names:
    importlib.import_module(name)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print(len(names))
"""


def test_every_serving_module_imports_with_torch_unimportable() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = len(list(pkgutil.walk_packages(serving.__path__, "serving.")))
    assert int(proc.stdout.strip()) == expected >= 12


def test_regenerating_the_protos_gives_no_diff(tmp_path: Path) -> None:
    env = {**os.environ, "OUT_DIR": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gen_protos.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    committed, fresh = REPO / "serving" / "_proto", tmp_path / "serving" / "_proto"
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files, "gen_protos.sh generated nothing"
    ours = sorted(p.relative_to(committed) for p in committed.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)
    assert ours == files, "serving/_proto/ holds files the generator does not make (or lacks some)"
    changed = [str(f) for f in files if not filecmp.cmp(committed / f, fresh / f, shallow=False)]
    assert not changed, f"stale generated code, run scripts/gen_protos.sh: {changed}"
    shutil.rmtree(tmp_path / "serving")
