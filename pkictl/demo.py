"""The main job on a throwaway local stack: start Azurite, create the root CA, print it.

Later features extend this script step by step; it exits 0 only if every step did what it says
and leaves no process behind.
"""

from __future__ import annotations

import io
import secrets
import tempfile
from pathlib import Path
from typing import TextIO

from devhost.azurite import Azurite


def run_demo(out: TextIO) -> int:
    from .cli import main

    def step(title: str) -> None:
        print(f"\n== {title}", file=out)

    with tempfile.TemporaryDirectory(prefix="pki-demo-") as workdir, Azurite() as azurite:
        env = {
            "AzureWebJobsStorage": azurite.connection_string,
            "LOCAL_KEYSTORE_DIR": str(Path(workdir) / "keystore"),
            "LOCAL_KEYSTORE_PASSPHRASE": secrets.token_urlsafe(24),
            "ROOT_CA_COMMON_NAME": "Contoso IoT Root CA (demo)",
            "ROOT_CA_ORGANIZATION": "Contoso",
        }
        print(f"local stack: Azurite on 127.0.0.1 (blob {azurite.blob_port}, queue {azurite.queue_port}), "
              f"key store in {workdir}", file=out)

        step("1. create the root CA (key in the key store, certificate in blob state)")
        if main(["root", "create"], env=env, out=out) != 0:
            return 1
        step("2. a second `root create` is refused: the root is made once")
        refused = io.StringIO()
        if main(["root", "create"], env=env, out=out, err=refused) != 1:
            print("FAILED: a second root was created", file=out)
            return 1
        print(refused.getvalue().strip(), file=out)
        step("3. the root certificate, as you upload it to DPS (`pkictl root show --pem`)")
        if main(["root", "show", "--pem"], env=env, out=out) != 0:
            return 1
        step("4. proof of possession for the code DPS shows (`pkictl verification-cert --code ...`)")
        code = secrets.token_hex(16).upper()
        pop = Path(workdir) / "verification.pem"
        if main(["verification-cert", "--code", code, "--out", str(pop)], env=env, out=out) != 0:
            return 1
        print("\ndemo complete: every step did what it says; Azurite stopped, temporary files removed", file=out)
    return 0
