"""The app's identity, end to end on the local platform: the managed identity endpoint as azure-identity calls
it, the token it mints, and every client of the app (storage, Key Vault, DPS, IoT Hub) using the identity the
settings name, the user-assigned one included, through the production credentials."""

from __future__ import annotations

import time

import jwt
import pytest
import requests

from clients.identity import app_credential, storage_credential
from devhost.stack import app_settings, person_settings
from edge.services import build_services
from emulators.identity import DPS, IOT_HUB, STORAGE, VAULT
from emulators.stack import ADMIN, APP, OPERATOR
from handlers.errors import NotPermitted
from pki.keys import KeyType
from settings import load_settings

pytestmark = pytest.mark.integration


def _get(stack, header: str | None = None, **params) -> requests.Response:
    query = {"api-version": "2019-08-01", "resource": VAULT, "client_id": stack.client_id(APP), **params}
    return requests.get(stack.issuer.endpoint, params={k: v for k, v in query.items() if v is not None},
                        headers={"X-IDENTITY-HEADER": stack.issuer.header if header is None else header}, timeout=10)


def test_the_identity_endpoint_answers_as_app_services_does(stack):
    # learn.microsoft.com/azure/app-service/overview-managed-identity, REST endpoint reference
    answer = _get(stack).json()
    assert set(answer) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert answer["resource"] == VAULT and answer["token_type"] == "Bearer" and isinstance(answer["expires_on"], str)
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    app = stack.principals[APP]
    assert claims["aud"] == VAULT and claims["iss"] == f"https://sts.windows.net/{stack.issuer.tenant_id}/"
    assert (claims["appid"], claims["oid"], claims["idtyp"]) == (app.client_id, app.object_id, "app")
    assert claims["exp"] - claims["iat"] == 600 and int(answer["expires_on"]) == claims["exp"]
    by_object_id = jwt.decode(_get(stack, client_id=None, principal_id=app.object_id).json()["access_token"],
                              options={"verify_signature": False})
    assert by_object_id["oid"] == app.object_id
    # no identity named: the system-assigned one, which the app does not have (it runs user-assigned)
    assert _get(stack, client_id=None).json()["message"] == "Unable to load the proper Managed Identity."
    assert _get(stack, client_id="00000000-0000-0000-0000-000000000000").status_code == 400
    assert _get(stack, header="wrong").status_code == 401
    assert _get(stack, **{"api-version": "2017-09-01"}).status_code == 400
    unknown = _get(stack, resource="https://graph.microsoft.com")
    assert unknown.status_code == 500 and "AADSTS500011" in unknown.json()["message"]


@pytest.mark.parametrize("resource", [VAULT, DPS, IOT_HUB, STORAGE])
def test_azure_identity_gets_a_token_for_the_real_audience_of_each_service(credential_of, stack, resource):
    token = credential_of(APP).get_token(f"{resource}/.default")
    assert stack.issuer.verify(f"Bearer {token.token}", resource)["appid"] == stack.client_id(APP)
    assert token.expires_on - time.time() > 500


def test_every_client_of_the_app_uses_the_user_assigned_identity_its_settings_name(azurite, stack):
    """The factory bug this replaces: a client that ignores AZURE_CLIENT_ID asks for the system-assigned identity
    (refused above); one that takes the wrong identity is refused by the service's roles (below)."""
    app = load_settings(app_settings(azurite, stack))
    operator = load_settings(person_settings(app_settings(azurite, stack), stack.client_id(OPERATOR)))
    for settings, principal in ((app, APP), (operator, OPERATOR)):
        for credential in (app_credential(settings), storage_credential(settings.storage, app_credential(settings))):
            token = credential.get_token(f"{VAULT}/.default").token
            assert jwt.decode(token, options={"verify_signature": False})["appid"] == stack.client_id(principal)
    # __clientId alone names the identity of every client (AZURE_CLIENT_ID unset)
    only_storage_id = load_settings({k: v for k, v in app_settings(azurite, stack).items() if k != "AZURE_CLIENT_ID"})
    token = app_credential(only_storage_id).get_token(f"{DPS}/.default").token
    assert jwt.decode(token, options={"verify_signature": False})["appid"] == stack.client_id(APP)

    services = build_services(app)
    key = services.keys.create_key(f"identity-{int(time.time() * 1000)}", KeyType.EC_P256)
    assert len(services.keys.signer(key)("ES256", b"\0" * 32)) == 64
    assert services.groups.get_group(stack.dps[0].name, "no-such-group") is None
    assert services.hubs.device(stack.iothub.hostname, "no-such-device") is None

    as_operator = build_services(operator)  # same code, the operator's identity: the services refuse by role
    with pytest.raises(NotPermitted, match=r"HTTP 403 Forbidden/ForbiddenByRbac.*keys/sign/action"):
        as_operator.keys.signer(key)("ES256", b"\0" * 32)
    with pytest.raises(NotPermitted, match=r"HTTP 401.*not authorized for PUT on /enrollmentGroups"):
        as_operator.groups.create_group(stack.dps[0].name, {"enrollmentGroupId": "no-such-group"})
    with pytest.raises(NotPermitted, match=r"HTTP 401.*IotHubUnauthorized"):
        as_operator.hubs.device(stack.iothub.hostname, "no-such-device")
    as_admin = build_services(load_settings(person_settings(app_settings(azurite, stack), stack.client_id(ADMIN))))
    with pytest.raises(NotPermitted, match="secrets/getSecret/action"):
        as_admin.secrets.get_secret("anything")


def test_azurite_refuses_a_token_for_another_resource_and_a_garbage_one(azurite, stack):
    url = f"{azurite.blob_service_uri}/?comp=list"
    headers = {"x-ms-version": "2021-08-06"}
    good = stack.issuer.mint(stack.principals[APP], STORAGE)
    assert requests.get(url, headers={**headers, "Authorization": f"Bearer {good}"}, verify=str(stack.ca_path),
                        timeout=10).status_code == 200
    for token in ("garbage", stack.issuer.mint(stack.principals[APP], VAULT)):
        refused = requests.get(url, headers={**headers, "Authorization": f"Bearer {token}"},
                               verify=str(stack.ca_path), timeout=10)
        assert refused.status_code in (401, 403) and "Authentication" in refused.text
