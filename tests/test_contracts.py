"""The contract checker itself (tests/contract_check.py): it must fail on anything the published specs do not
declare, or the end-to-end contract check (tests/test_pkictl.py, `pytest -m contract`) proves nothing."""

from __future__ import annotations

import copy

import pytest

from .contract_check import check_exchange, contracts_for

pytestmark = pytest.mark.contract

GROUP = {"enrollmentGroupId": "contoso", "etag": "\"1\"", "provisioningStatus": "enabled",
         "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"info": {
             "subjectName": "CN=contoso", "sha1Thumbprint": "AB", "sha256Thumbprint": "CD", "issuerName": "CN=root",
             "notBeforeUtc": "2026-11-30T00:00:00Z", "notAfterUtc": "2031-11-30T00:00:00Z", "serialNumber": "01",
             "version": 3}}}}},
         "createdDateTimeUtc": "2026-11-30T00:00:00Z", "lastUpdatedDateTimeUtc": "2026-11-30T00:00:00Z"}


def _exchange(**changes) -> dict:
    return {"server": "dps1", "method": "GET", "path": "/enrollmentGroups/contoso", "query": ["api-version"],
            "requestBody": None, "status": 200, "responseBody": copy.deepcopy(GROUP), **changes}


def test_a_declared_exchange_passes():
    operation, problems = check_exchange(_exchange(), contracts_for("dps1"))
    assert (operation.operation_id, problems) == ("EnrollmentGroup_Get", [])


def test_a_planted_field_is_caught():
    body = copy.deepcopy(GROUP)
    body["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["colour"] = "red"
    _, problems = check_exchange(_exchange(responseBody=body), contracts_for("dps1"))
    assert problems == [("dps1 GET /enrollmentGroups/contoso response 200.attestation.x509.signingCertificates."
                         "primary.info: field 'colour' is not declared")]


@pytest.mark.parametrize("changes, expected", [
    ({"status": 201}, "status 201 is not declared"),
    ({"responseBody": {**GROUP, "provisioningStatus": "paused"}}, "'paused' is not one of ['enabled', 'disabled']"),
    ({"responseBody": {**GROUP, "etag": 7}}, "etag: expected string"),
    ({"query": ["api-version", "top"]}, "query parameter 'top' is not declared"),
    ({"method": "PATCH"}, "no such operation"),
    ({"status": 404, "responseBody": {"errorCode": 404201, "trackingId": "t", "message": "m",
                                      "timestampUtc": "2026-11-30T00:00:00Z", "hint": "x"}}, "field 'hint'"),
])
def test_an_undeclared_status_enum_type_parameter_or_operation_is_caught(changes, expected):
    _, problems = check_exchange(_exchange(**changes), contracts_for("dps1"))
    assert problems and expected in problems[0], problems


def test_every_emulated_service_with_a_published_spec_has_a_table():
    for server in ("keyvault", "rootvault", "dps1", "dps2", "dps-device", "arm"):
        assert contracts_for(server)
    assert contracts_for("iothub") == []  # the IoT Hub data-plane spec is not in the published set we can read
