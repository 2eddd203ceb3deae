"""pkictl as people use it: real files, real exit codes, no tracebacks."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pki import export
from pki.keys import KeyType, generate_key
from pkictl.cli import build_parser, main

from .x509_helpers import NOW, break_signature, make_chain, make_csr, write_pem

REPO = Path(__file__).resolve().parent.parent


def run(argv, env=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, env=env if env is not None else {}, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("doctor")
    chain = make_chain(device_days=30)
    write_pem(d, "device.pem", chain.device)
    write_pem(d, "device-with-chain.pem", chain.device, chain.intermediate)
    write_pem(d, "intermediate.pem", chain.intermediate)
    write_pem(d, "chain.pem", chain.intermediate, chain.root)  # what the service ships after the device
    write_pem(d, "root.pem", chain.root)
    (d / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnot really base64!\n-----END CERTIFICATE-----\n")
    (d / "key.pem").write_bytes(export.key_pem(generate_key(KeyType.EC_P256)))  # made now, never committed
    (d / "good.csr").write_bytes(make_csr("device-001"))
    (d / "broken.csr").write_bytes(break_signature(make_csr("device-001")))
    return d


def doctor(files, *extra):
    return run(["doctor", "--cert", str(files / "device.pem"), "--root", str(files / "root.pem"),
                "--now", NOW.isoformat(), *extra])


def test_doctor_healthy_chain_exits_0(files):
    code, out, _ = doctor(files, "--chain", str(files / "chain.pem"), "--registration-id", "device-001")
    assert code == 0
    assert "no problems found" in out
    code, out, _ = doctor(files, "--chain", str(files / "intermediate.pem"), "--registration-id", "device-001")
    assert code == 0 and "WARNING [root-not-sent]" in out


def test_doctor_finds_a_missing_intermediate(files):
    code, out, _ = doctor(files, "--registration-id", "device-001")
    assert code == 1
    assert "ERROR [missing-intermediate]" in out
    assert "fix: send the device certificate followed by the intermediate" in out


def test_doctor_finds_a_wrong_cn(files):
    code, out, _ = doctor(files, "--chain", str(files / "intermediate.pem"), "--registration-id", "device-002")
    assert code == 1
    assert "ERROR [cn-mismatch]" in out and "fix: register as 'device-001'" in out


def test_doctor_finds_an_expired_certificate(files):
    later = (NOW + dt.timedelta(days=60)).date().isoformat()
    code, out, _ = run(["doctor", "--cert", str(files / "device-with-chain.pem"), "--root", str(files / "root.pem"),
                        "--now", later])
    assert code == 1
    assert "ERROR [device-expired]" in out and "fix: issue a new device certificate" in out


def test_doctor_json(files):
    code, out, _ = doctor(files, "--json")
    assert code == 1
    assert '"code": "missing-intermediate"' in out


@pytest.mark.parametrize("argv, message", [
    (["doctor", "--cert", "{d}/broken.pem"], "error: --cert: malformed PEM certificate"),
    (["doctor", "--cert", "{d}/key.pem"], "error: --cert: expected '-----BEGIN CERTIFICATE-----', found '{key}'"),
    (["doctor", "--cert", "{d}/absent.pem"], "error: --cert {d}/absent.pem: No such file or directory"),
    (["doctor", "--cert", "{d}/device.pem", "--registration-id", "Device-1"], "must be lowercase"),
    (["doctor", "--cert", "{d}/device.pem", "--now", "yesterday"], "--now: 'yesterday' is not an ISO date"),
    (["csr", "check", "--csr", "{d}/broken.csr", "--device-id", "device-001"],
     "error: --csr: signature does not verify"),
    (["csr", "check", "--csr", "{d}/good.csr", "--device-id", "device-002"], "does not match deviceId 'device-002'"),
    (["id", "check", "Device-1"], "error: id: 'Device-1' is not a valid DPS registration id: must be lowercase"),
    (["id", "check", "a" * 65], "must be at most 64 characters, got 65"),
])
def test_bad_input_is_one_clear_line_and_exit_2(files, argv, message):
    code, out, err = run([a.replace("{d}", str(files)) for a in argv])
    assert code == 2
    key_label = (files / "key.pem").read_text().splitlines()[0]
    assert message.replace("{d}", str(files)).replace("{key}", key_label) in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_good_csr_and_id_pass(files):
    assert run(["csr", "check", "--csr", str(files / "good.csr"), "--device-id", "device-001"])[0] == 0
    assert run(["id", "check", "device-001"])[0] == 0


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = [["root", "create"], ["root", "show"], ["verification-cert"], ["doctor"], ["csr", "check"],
                ["id", "check"], ["demo"], []]
    for command in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*command, "--help"])
        assert done.value.code == 0
    assert "usage: pkictl" in capsys.readouterr().out


def test_bad_usage_exits_2():
    assert run(["root", "create", "--key-type", "rsa-1024"])[0] == 2
    assert run(["frobnicate"])[0] == 2


def test_commands_needing_storage_name_the_missing_setting():
    code, _, err = run(["root", "show"], env={})
    assert code == 2
    assert "setting AzureWebJobsStorage: is not set" in err


def test_no_azure_credential_is_one_line_naming_the_settings_to_check():
    """#19: with no `az login` and no managed identity, DefaultAzureCredential's error lists every credential it
    tried (tens of lines); the CLI says it in one line, naming what to do and the settings to check."""
    from azure.core.exceptions import ClientAuthenticationError

    from clients.errors import translated

    chain_error = "DefaultAzureCredential failed to retrieve a token from the included credentials.\n" + "\n".join(
        f"{name}: unavailable." for name in ("EnvironmentCredential", "WorkloadIdentityCredential",
                                             "ManagedIdentityCredential", "AzureCliCredential"))

    def connect(env):
        with translated("container pki-state"):
            raise ClientAuthenticationError(chain_error)

    out, err = io.StringIO(), io.StringIO()
    assert main(["root", "show"], env={"AzureWebJobsStorage": "unused"}, out=out, err=err, connect=connect) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: container pki-state: no Azure credential could sign in")
    for hint in ("az login", "AZURE_CLIENT_ID", "AzureWebJobsStorage__clientId", "IDENTITY_ENDPOINT"):
        assert hint in lines[0]


def test_with_no_credential_at_all_a_command_says_so_at_once_in_one_line(tmp_path):
    """No `az login`, no managed identity: the storage client would retry its token failure with backoff for a
    minute and more; pkictl asks for one token first and answers at once (the subprocess gets no identity
    endpoint, whatever this test process has)."""
    env = {"HOME": str(tmp_path), "AzureWebJobsStorage__blobServiceUri": "https://127.0.0.1:9",
           "AzureWebJobsStorage__queueServiceUri": "https://127.0.0.1:9",
           "AzureWebJobsStorage__credential": "managedidentity"}
    done = _pkictl(["root", "show"], env, tmp_path, timeout=30)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert "no Azure credential could sign in" in done.stderr and "IDENTITY_ENDPOINT" in done.stderr


def test_an_identity_endpoint_that_does_not_answer_is_named_in_one_line(tmp_path):
    """The local stack's settings with the stack stopped: the identity endpoint refuses connections."""
    env = {"HOME": str(tmp_path), "AzureWebJobsStorage__blobServiceUri": "https://127.0.0.1:9",
           "AzureWebJobsStorage__queueServiceUri": "https://127.0.0.1:9",
           "AzureWebJobsStorage__credential": "managedidentity", "IDENTITY_ENDPOINT": "http://127.0.0.1:9/msi/token",
           "IDENTITY_HEADER": "x"}
    done = _pkictl(["root", "show"], env, tmp_path, timeout=60)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "storage https://127.0.0.1:9" in done.stderr and "unexpected" not in done.stderr


def _pkictl(args, env, cwd, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "pkictl", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **env}, timeout=timeout)


@pytest.mark.integration
def test_root_create_then_show_pem_is_a_ca_certificate_openssl_reads(azurite_env, tmp_path):
    created = _pkictl(["root", "create", "--key-type", "ec-p384", "--validity-years", "15"], azurite_env, tmp_path)
    assert created.returncode == 0, created.stderr
    assert "root CA created" in created.stdout
    shown = _pkictl(["root", "show", "--pem"], azurite_env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=shown.stdout, capture_output=True, text=True,
                          check=True).stdout
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "ASN1 OID: secp384r1" in text
    again = _pkictl(["root", "create"], azurite_env, tmp_path)
    assert again.returncode == 1
    assert "pass --force to replace it" in again.stderr
    summary = _pkictl(["root", "show", "--json"], azurite_env, tmp_path)
    assert '"keyType": "ec-p384"' in summary.stdout
    assert "PRIVATE KEY" not in created.stdout + shown.stdout + summary.stdout


@pytest.mark.integration
def test_verification_cert_is_signed_by_the_root(azurite_env, tmp_path):
    assert _pkictl(["root", "create", "--key-type", "rsa-3072"], azurite_env, tmp_path).returncode == 0
    root = _pkictl(["root", "show", "--pem"], azurite_env, tmp_path).stdout
    (tmp_path / "root.pem").write_text(root)
    made = _pkictl(["verification-cert", "--code", "0A1B2C3D4E5F", "--out", "pop.pem"], azurite_env, tmp_path)
    assert made.returncode == 0, made.stderr
    verify = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "pop.pem"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", "pop.pem"], cwd=tmp_path,
                             capture_output=True, text=True).stdout
    assert "CN = 0A1B2C3D4E5F" in subject


@pytest.mark.integration
def test_local_settings_json_is_read_when_the_environment_is_silent(azurite_env, tmp_path):
    import json

    (tmp_path / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": azurite_env}))
    result = _pkictl(["root", "show"], {}, tmp_path)
    assert result.returncode == 1
    assert "no root CA yet: run `pkictl root create`" in result.stderr


# The operations the service performs on each emulated service, by the operation ids of the published specs:
# the demo plus the commands run after it must exercise every one (and only what the specs declare).
SERVICE_OPERATIONS = {
    "keyvault-keys.json": {"CreateKey", "GetKey", "sign"},
    "keyvault-secrets.json": {"SetSecret", "GetSecret"},
    "dps-service.json": {"EnrollmentGroup_Get", "EnrollmentGroup_CreateOrUpdate", "IndividualEnrollment_Get",
                         "IndividualEnrollment_CreateOrUpdate", "IndividualEnrollment_Delete",
                         "DeviceRegistrationState_Get", "DeviceRegistrationState_Query"},
    "dps-device.json": {"RuntimeRegistration_RegisterDeviceAndIssueCertificate",
                        "RuntimeRegistration_OperationStatusLookup"},
    "dps-management.json": {"DpsCertificate_Get", "DpsCertificate_CreateOrUpdate", "DpsCertificate_List",
                            "DpsCertificate_GenerateVerificationCode", "DpsCertificate_VerifyCertificate"},
}


def _more_commands(env: dict, store) -> None:
    """After the demo: the commands it does not send (enable a device; a customer disabled with its devices and
    enabled again), so that every DPS and IoT Hub operation the service uses is exercised."""
    import time

    for args in (["enable-device", "--customer", "contoso-gmbh", "--device", "sensor-0003"],
                 ["disable-customer", "--customer", "contoso-gmbh", "--disable-devices"],
                 ["enable-customer", "--customer", "contoso-gmbh"]):
        out = io.StringIO()
        assert main(["send", "command", *args, "--reason", "contract run"], env=env, out=out, err=out) == 0, \
            out.getvalue()
        record = "devices/sensor-0003.json" if "--device" in args else "customers/contoso-gmbh.json"
        # a failed attempt comes back after host.json's visibilityTimeout (30 s): room for a few of them
        deadline = time.monotonic() + 150
        while (store.get(record).data.get("lastCommand") or {}).get("command") != args[0] or \
                not store.get(record).data["lastCommand"].get("applied"):
            if time.monotonic() > deadline:
                failures = [store.get(n).data for n in store.find("\"kind\" = 'failure'")]
                raise AssertionError(f"{args[0]} did not apply: lastCommand "
                                     f"{store.get(record).data.get('lastCommand')}; failures {failures}")
            time.sleep(0.3)


@pytest.mark.integration
@pytest.mark.contract
def test_the_demo_runs_end_to_end_speaks_the_published_contracts_and_leaks_no_secret():
    from devhost.leaks import find_leaks
    from pkictl.common import connect_to
    from pkictl.demo import run_demo

    from .contract_check import check_exchange, contracts_for

    out = io.StringIO()
    scans: list = []
    exchanges: list = []

    def inspect(stack, env):
        _more_commands(env, connect_to(env).store)
        exchanges.extend(stack.emulators.exchanges)
        scans.append(find_leaks(stack, [("demo output", out.getvalue())]))
        # the scanner can fail: a PFX password and an access token planted in a blob are found
        planted = stack.azurite.blob_service().get_container_client("pki-state")
        token = stack.emulators.issuer.mint(stack.emulators.principals["pki-app"], "https://vault.azure.net")
        planted.upload_blob("probe.txt", f"oops {stack.emulators.keyvault.secret_values()[0]}".encode())
        planted.upload_blob("probe-token.txt", f"Authorization: Bearer {token}".encode())
        scans.append(find_leaks(stack))

    assert run_demo(out, main, inspect=inspect, record_exchanges=True) == 0, out.getvalue()[-3000:]
    text = out.getvalue()
    for expected in ("demo complete", "DPS dps2: verified (pki-root-", "errorCode 401005",
                     "disable-device       changed",
                     "notice ", "(secondary)"):
        assert expected in text
    leaks, scanned = scans[0]
    assert leaks == [] and scanned > 50
    assert sorted(scans[1][0]) == ["blob pki-state/probe-token.txt: an access token",
                                   "blob pki-state/probe.txt: the Key Vault secret #0"]
    # every request the real SDKs sent, and every answer, as the published specs declare them
    problems, seen, unchecked = [], {}, set()
    for exchange in exchanges:
        contracts = contracts_for(exchange["server"])
        if not contracts:
            unchecked.add(exchange["server"])  # IoT Hub and the identity endpoint: no published spec stored
            continue
        operation, found = check_exchange(exchange, contracts)
        problems += found
        if operation is not None:
            seen.setdefault(operation.contract, set()).add(operation.operation_id)
    assert problems == [], "\n".join(sorted(set(problems))[:40])
    for contract, operations in SERVICE_OPERATIONS.items():
        assert operations <= seen.get(contract, set()), (contract, operations - seen.get(contract, set()))
    assert unchecked == {"iothub", "identity"}
    print(f"contract: {len(exchanges)} exchanges, {sum(len(v) for v in seen.values())} operations checked: "
          f"{ {k: sorted(v) for k, v in seen.items()} }")


@pytest.mark.parametrize(("line", "expected"), [("pkictl cust", "customer"), ("pkictl customer list --j", "--json")])
def test_shell_completion_through_argcomplete(tmp_path, line, expected):
    """#19: `eval "$(register-python-argcomplete pkictl)"` completes commands and options: the shell runs pkictl with
    argcomplete's environment, and it answers with the completions and exits (argcomplete's protocol)."""
    answer = tmp_path / "completions"
    done = subprocess.run([sys.executable, "-m", "pkictl"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "_ARGCOMPLETE": "1",
                               "COMP_LINE": line, "COMP_POINT": str(len(line)),
                               "_ARGCOMPLETE_STDOUT_FILENAME": str(answer)})
    assert done.returncode == 0, done.stderr
    assert answer.read_text().split() == [expected]


def test_device_renew_writes_a_returned_certificate_only_if_the_chain_doctor_and_the_new_key_agree():
    """`pkictl device renew` checks what the webhook returned with the chain doctor (pki/doctor.py: CN, profile,
    validity, the chain up to its self-signed root) and that it is for the key it just made."""
    from pkictl.commands.devices import _renewal_problem

    good = make_chain(device_id="renew-9", now=dt.datetime.now(dt.UTC))
    other = make_chain(device_id="renew-9", now=dt.datetime.now(dt.UTC))
    chain = [good.intermediate, good.root]
    assert _renewal_problem(good.device, chain, good.device_key, "renew-9") is None
    assert _renewal_problem(good.device, chain, other.device_key, "renew-9") == "it is not for the new key"
    assert _renewal_problem(good.device, chain, good.device_key, "renew-10")  # another CN
    assert _renewal_problem(good.device, [other.intermediate, other.root], good.device_key, "renew-9")  # not its chain
    assert _renewal_problem(good.device, [good.intermediate], good.device_key, "renew-9")  # no root
