"""``providers`` stands alone: importing every module of it pulls in nothing of ``paysvc`` or ``ledger``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys
import providers, providers.sandbox, providers.bakong, providers.aba_payway, providers.registry
providers.load_providers({"sandbox": {"secrets": ["s"]}, "bakong": {"token": "t"},
                          "aba_payway": {"merchant_id": "m", "api_key": "k"}})
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("paysvc", "ledger"))
assert not bad, bad
print("ok")
"""


def test_providers_import_nothing_of_paysvc_or_ledger():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
