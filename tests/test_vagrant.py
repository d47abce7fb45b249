"""The Vagrantfile is valid for Vagrant (``vagrant validate``; scripts/setup.sh installs it)
and provisions with the same set-up script CI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAGRANTFILE = ROOT / "Vagrantfile"


def validate(vagrantfile: str, where: Path) -> subprocess.CompletedProcess:
    """`vagrant validate` on a copy, so that Vagrant's state (.vagrant/, ~/.vagrant.d) lands
    in ``where`` and not in the checkout. No provider (VirtualBox, libvirt) is installed
    here: its settings are skipped, everything else is checked."""
    (where / "Vagrantfile").write_text(vagrantfile)
    env = os.environ | {"VAGRANT_HOME": str(where / "home"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    return subprocess.run([shutil.which("vagrant") or "vagrant", "validate", "--ignore-provider"],
                          cwd=where, env=env, capture_output=True, text=True, timeout=120)


def test_vagrant_validate(tmp_path):
    r = validate(VAGRANTFILE.read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_vagrant_validate_catches_errors(tmp_path):
    broken = VAGRANTFILE.read_text().replace('config.vm.box = "debian/bookworm64"',
                                             'config.vm.box = nil\n  config.vm.nosuch = 1')
    r = validate(broken, tmp_path)
    assert r.returncode != 0


def test_provisioned_by_the_ci_setup_script():
    text = VAGRANTFILE.read_text()
    assert re.search(r'inline: "bash /vagrant/scripts/setup.sh"', text)
    assert 'config.vm.box = "debian/bookworm64"' in text
    # CI runs scripts/test.sh, which runs the same scripts/setup.sh.
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
