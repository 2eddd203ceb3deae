import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from pki import profiles
from pki.doctor import diagnose
from pki.keys import KeyType, generate_key

from .x509_helpers import NOW, make_chain, remote


@pytest.fixture(scope="module")
def chain():
    return make_chain(device_days=30)


def codes(findings, severity=None):
    return [f.code for f in findings if severity is None or f.severity == severity]


def test_a_healthy_chain_has_no_findings(chain):
    findings = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                        registration_id="device-001", group_certificates=[chain.intermediate], now=NOW)
    assert findings == []


def test_a_chain_without_the_root_is_a_warning(chain):
    # DPS's docs: the device presents its chain "up to and including" the verified certificate
    findings = diagnose(chain.device, presented=[chain.intermediate], root=chain.root, now=NOW)
    assert codes(findings) == ["root-not-sent"] and codes(findings, "error") == []


def test_missing_intermediate_is_named_with_its_fix(chain):
    findings = diagnose(chain.device, presented=[], root=chain.root, registration_id="device-001", now=NOW)
    assert codes(findings) == ["missing-intermediate"]
    assert "CN=contoso" in findings[0].message and "401002" in findings[0].message
    assert "chain.pem" in findings[0].fix


def test_wrong_cn(chain):
    findings = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                        registration_id="device-002", now=NOW)
    assert codes(findings) == ["cn-mismatch"]
    assert "'device-001' is not the registration id 'device-002'" in findings[0].message


def test_expired_and_not_yet_valid(chain):
    later = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                     now=NOW + dt.timedelta(days=31))
    assert codes(later) == ["device-expired"]
    assert later[0].fix == "issue a new device certificate"
    earlier = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                       now=NOW - dt.timedelta(days=1))
    assert "device-not-yet-valid" in codes(earlier)


def test_group_holding_another_intermediate_of_the_same_name(chain):
    other = make_chain(device_days=30)  # same subject names, other keys
    findings = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                        group_certificates=[other.intermediate], now=NOW)
    assert codes(findings) == ["group-mismatch"]
    assert "thumbprint" in findings[0].message and "new primary, old secondary" in findings[0].fix


def test_group_with_the_old_intermediate_as_secondary_still_matches(chain):
    other = make_chain(device_days=30)
    findings = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                        group_certificates=[other.intermediate, chain.intermediate], now=NOW)
    assert findings == []


def test_group_trusting_the_root_needs_verification(chain):
    findings = diagnose(chain.device, presented=[chain.intermediate, chain.root], root=chain.root,
                        group_certificates=[chain.root], now=NOW)
    assert codes(findings) == ["root-verification"]
    assert "verification-cert" in findings[0].fix


def test_a_recreated_intermediate_with_the_same_name_is_not_the_issuer(chain):
    other = make_chain(device_days=30)
    findings = diagnose(chain.device, presented=[other.intermediate], now=NOW)
    assert "aki-ski-mismatch" in codes(findings, "error")


def test_chain_to_another_root(chain):
    other = make_chain(device_days=30)
    findings = diagnose(chain.device, presented=[chain.intermediate], root=other.root, now=NOW)
    assert codes(findings, "error") == ["root-mismatch"]


def test_chain_out_of_order_is_a_warning(chain):
    findings = diagnose(chain.device, presented=[chain.root, chain.intermediate], root=chain.root, now=NOW)
    assert set(codes(findings)) == {"chain-order"}
    assert codes(findings, "error") == []


def test_expired_intermediate(chain):
    short = make_chain(intermediate_days=40, device_days=30)
    findings = diagnose(short.device, presented=[short.intermediate, short.root], root=short.root,
                        now=NOW + dt.timedelta(days=41))
    assert codes(findings) == ["device-expired", "intermediate-expired"]


def test_device_that_claims_to_be_a_ca(chain):
    key = generate_key(KeyType.EC_P256)
    bad = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-001")]))
           .issuer_name(chain.intermediate.subject).public_key(key.public_key())
           .serial_number(profiles.new_serial()).not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(remote(chain.intermediate_key), hashes.SHA256()))
    findings = diagnose(bad, presented=[chain.intermediate, chain.root], root=chain.root,
                        now=NOW + dt.timedelta(hours=1))
    assert {"device-is-ca", "device-eku"} <= set(codes(findings))
    assert all(f.fix for f in findings)
