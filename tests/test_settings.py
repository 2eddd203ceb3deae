import json

import pytest

from settings import SettingsError, environment, load_settings

IDENTITY = {"AzureWebJobsStorage": "",  # an identity-based connection, as docs/deploy.md configures it
            "AzureWebJobsStorage__blobServiceUri": "https://acct.blob.core.windows.net",
            "AzureWebJobsStorage__credential": "managedidentity",
            "AzureWebJobsStorage__clientId": "6a1f8c1e-2f4b-4a8e-9d7c-1b2c3d4e5f60"}
CONN = "DefaultEndpointsProtocol=http;AccountName=x;AccountKey=c2VjcmV0;BlobEndpoint=http://127.0.0.1:1/x;"


def test_defaults():
    settings = load_settings({"AzureWebJobsStorage": CONN})
    assert settings.state_container == "pki-state"
    assert settings.root_key_type.value == "ec-p384"
    assert settings.root_validity_years == 20
    assert settings.key_vault_url is None


def test_missing_storage_names_the_setting():
    with pytest.raises(SettingsError, match="setting AzureWebJobsStorage: is not set"):
        load_settings({})


def test_identity_based_storage_builds_endpoints():
    settings = load_settings({"AzureWebJobsStorage__accountName": "contosopki",
                              "AzureWebJobsStorage__credential": "managedidentity"})
    assert settings.storage.blob_service_uri == "https://contosopki.blob.core.windows.net"
    assert settings.storage.queue_service_uri == "https://contosopki.queue.core.windows.net"


@pytest.mark.parametrize("env, name", [
    ({"ROOT_CA_VALIDITY_YEARS": "ten"}, "ROOT_CA_VALIDITY_YEARS"),
    ({"ROOT_CA_VALIDITY_YEARS": "99"}, "ROOT_CA_VALIDITY_YEARS"),
    ({"ROOT_CA_KEY_TYPE": "rsa-1024"}, "ROOT_CA_KEY_TYPE"),
    ({"ROOT_CA_KEY_TYPE": "rsa-2048"}, "ROOT_CA_KEY_TYPE"),
    ({"STATE_CONTAINER": "Bad_Name"}, "STATE_CONTAINER"),
    ({"KEY_VAULT_URL": "http://vault"}, "KEY_VAULT_URL"),
    ({"ROOT_CA_KEY_NAME": "root ca"}, "ROOT_CA_KEY_NAME"),
    ({"AzureWebJobsStorage": "nonsense"}, "AzureWebJobsStorage"),
    ({**IDENTITY, "AzureWebJobsStorage__credential": "clientsecret"}, "AzureWebJobsStorage__credential"),
    ({**IDENTITY, "AzureWebJobsStorage__clientId": "not-a-guid"}, "AzureWebJobsStorage__clientId"),
    ({**IDENTITY, "AzureWebJobsStorage__managedIdentityResourceId": "/x"}, "AzureWebJobsStorage__clientId"),
    ({**IDENTITY, "AzureWebJobsStorage__blobServiceUri": "http://127.0.0.1:1/a"}, "AzureWebJobsStorage__blobServiceUri"),
    ({**IDENTITY, "AZURE_CLIENT_ID": "app"}, "AZURE_CLIENT_ID"),
])
def test_malformed_settings_fail_with_their_name(env, name):
    with pytest.raises(SettingsError) as caught:
        load_settings({"AzureWebJobsStorage": CONN, **env})
    assert caught.value.name == name
    assert str(caught.value).startswith(f"setting {name}: ")


def test_an_identity_based_connection_is_read_as_the_functions_host_reads_it():
    settings = load_settings({**IDENTITY, "AZURE_CLIENT_ID": IDENTITY["AzureWebJobsStorage__clientId"]})
    storage = settings.storage
    assert (storage.credential, storage.client_id, storage.connection_string) == (
        "managedidentity", IDENTITY["AzureWebJobsStorage__clientId"], None)
    assert storage.queue_service_uri == "https://acct.queue.core.windows.net"
    assert settings.client_id == IDENTITY["AzureWebJobsStorage__clientId"]


def test_the_storage_key_never_shows_in_repr():
    settings = load_settings({"AzureWebJobsStorage": CONN})
    assert "c2VjcmV0" not in repr(settings)


def test_environment_wins_over_local_settings(tmp_path):
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": {"A": "file", "B": "file"}}))
    assert environment(path, {"B": "env"}) == {"A": "file", "B": "env"}
    assert environment(tmp_path / "absent.json", {"B": "env"}) == {"B": "env"}
    path.write_text("{not json")
    with pytest.raises(SettingsError, match="cannot be read as JSON"):
        environment(path, {})
