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
    ({**IDENTITY, "AzureWebJobsStorage__blobServiceUri": "http://127.0.0.1:1/a"},
     "AzureWebJobsStorage__blobServiceUri"),
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


def test_host_json_values_are_overridden_by_azure_functions_job_host_settings(tmp_path):
    """learn.microsoft.com/azure/azure-functions/functions-host-json#override-hostjson-values"""
    from settings import HostLimits, host_json

    path = tmp_path / "host.json"
    path.write_text(json.dumps({"functionTimeout": "00:10:00", "extensions": {"queues": {"batchSize": 16}}}))
    document = host_json(path, {"AzureFunctionsJobHost__functionTimeout": "00:05:00",
                                "AzureFunctionsJobHost__extensions__queues__newBatchThreshold": "4",
                                "AzureFunctionsJobHost__extensions__blobs__poisonBlobThreshold": "2"})
    limits = HostLimits.of(document, cores=4)
    assert (limits.function_timeout_s, limits.batch_size, limits.new_batch_threshold) == (300, 16, 4)
    assert document["extensions"]["blobs"] == {"poisonBlobThreshold": "2"}
    unset = HostLimits.of({}, cores=4)  # the host's defaults: 30 minutes; 16 + 16 / 2 x cores
    assert (unset.function_timeout_s, unset.queue_concurrency) == (1800, 16 + 32)


KEY_VAULT = {"AzureWebJobsStorage": CONN, "KEY_VAULT_URL": "https://pki.vault.azure.net",
             "ROOT_CA_KEY_VAULT_URL": "https://pki-root.vault.azure.net"}


@pytest.mark.parametrize("name", ["customer-evil", "Customer-Evil", "CUSTOMER-x", "customer-"])
def test_a_root_key_name_in_the_customers_namespace_is_refused_at_startup(name):
    # Onboarding customer "evil" would otherwise take the root key (customer-evil) as its intermediate key; Key
    # Vault names ignore case, so Customer-Evil is the same key. With Key Vault or the local key store alike.
    for env in ({"AzureWebJobsStorage": CONN}, KEY_VAULT):
        with pytest.raises(SettingsError) as caught:
            load_settings({**env, "ROOT_CA_KEY_NAME": name})
        assert caught.value.name == "ROOT_CA_KEY_NAME" and "customer-" in str(caught.value)
    assert load_settings({**KEY_VAULT, "ROOT_CA_KEY_NAME": "customers-root"}).root_key_name == "customers-root"


def test_the_root_key_has_a_vault_of_its_own():
    settings = load_settings({**KEY_VAULT, "ROOT_CA_KEY_VAULT_URL": "https://pki-root.vault.azure.net/"})
    assert (settings.key_vault_url, settings.root_key_vault_url) == ("https://pki.vault.azure.net",
                                                                      "https://pki-root.vault.azure.net")
    refused = {
        "required with KEY_VAULT_URL": {**KEY_VAULT, "ROOT_CA_KEY_VAULT_URL": ""},
        "KEY_VAULT_URL is not": {"AzureWebJobsStorage": CONN,
                                 "ROOT_CA_KEY_VAULT_URL": "https://pki-root.vault.azure.net"},
        "another vault": {**KEY_VAULT, "ROOT_CA_KEY_VAULT_URL": "https://PKI.vault.azure.net/"},
        "https://": {**KEY_VAULT, "ROOT_CA_KEY_VAULT_URL": "http://pki-root.vault.azure.net"},
    }
    for words, env in refused.items():
        with pytest.raises(SettingsError, match=words) as caught:
            load_settings(env)
        assert caught.value.name == "ROOT_CA_KEY_VAULT_URL", words


def test_the_shipped_host_json_and_default_settings_let_a_chunk_finish_well_inside_the_timeout():
    from edge.services import APP_ROOT, check_chunk_time
    from settings import HostLimits, host_json

    limits = HostLimits.of(host_json(APP_ROOT / "host.json", {}))
    assert (limits.function_timeout_s, limits.queue_concurrency) == (600, 3)
    check_chunk_time(load_settings(KEY_VAULT), limits)  # 500 rows x 3 chunks / 100 signs/s = 15 s <= 300 s


@pytest.mark.parametrize("extra, fits", [
    ({"BATCH_CHUNK_ROWS": "2000"}, 1250),  # 2000 x 24 / 100 = 480 s
    ({"INTERMEDIATE_KEY_TYPE": "rsa-4096"}, 156),  # 100 signs/s scaled to 12.5 for RSA-4096: 960 s
])
def test_chunks_that_cannot_finish_well_inside_function_timeout_at_the_sign_rate_are_refused(extra, fits):
    from edge.services import check_chunk_time
    from settings import HostLimits

    limits = HostLimits(function_timeout_s=600, batch_size=16, new_batch_threshold=8)
    with pytest.raises(SettingsError, match=rf"setting BATCH_CHUNK_ROWS: .* up to 24 chunks run at once per "
                                            rf"instance .* Set BATCH_CHUNK_ROWS to {fits} or less"):
        check_chunk_time(load_settings({**KEY_VAULT, **extra}), limits)
    check_chunk_time(load_settings({**KEY_VAULT, **extra, "BATCH_CHUNK_ROWS": str(fits)}), limits)
    check_chunk_time(load_settings({**KEY_VAULT, **extra}), HostLimits(None, 16, 8))  # no timeout (-1)


def test_the_example_settings_load_and_list_every_setting_the_app_reads():
    """#19: `local.settings.example.json` holds working values (copied as Functions users copy it, the app starts):
    they load, the schedule parses as the host's NCRONTAB, every value is a string (as the host requires), every
    setting settings.py reads is there, and each is explained in the README's settings table."""
    import re
    from pathlib import Path

    from devhost.schedule import Schedule

    root = Path(__file__).resolve().parents[1]
    document = json.loads((root / "local.settings.example.json").read_text())
    values = document["Values"]
    assert document["IsEncrypted"] is False
    assert all(isinstance(v, str) for v in values.values())
    settings = load_settings(values)
    assert settings.key_vault_url == "https://pki-intermediates.vault.azure.net"
    assert [i.name for i in settings.dps_pool] == ["dps1"]
    assert settings.storage.credential == "managedidentity"
    Schedule.parse(values["EXPIRY_SWEEP_SCHEDULE"])
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{3,})"', (root / "settings.py").read_text()))
    assert read - set(values) == set()
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("\n## ", readme.index("## Settings") + 1)]
    unexplained = [name for name in values if name != "FUNCTIONS_WORKER_RUNTIME"
                   and f"`{name}`" not in table and f"`__{name.split('__')[-1]}`" not in table]
    assert unexplained == []


def test_key_protection_is_software_unless_hsm_is_asked_for():
    from settings import load_settings as load

    base = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    assert load(base).key_protection == "software"
    assert load({**base, "KEY_VAULT_KEY_PROTECTION": "HSM"}).key_protection == "hsm"
    with pytest.raises(SettingsError, match="KEY_VAULT_KEY_PROTECTION"):
        load({**base, "KEY_VAULT_KEY_PROTECTION": "hardware"})
