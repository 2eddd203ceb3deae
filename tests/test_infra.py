"""#19: the `azd up` deployment (azure.yaml, infra/*.bicep) against the app and the docs. No Azure subscription is
available to the tests, and no Bicep compiler can be installed from the package registries the project builds from
(the official one ships as a NuGet package and a GitHub download), so the Bicep is read as text: its role-assignment
table, custom roles, app settings, containers and queues must be what the app, the local stack and docs/deploy.md say.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emulators.rbac import BUILT_IN_ROLES, CUSTOM_ROLES
from emulators.stack import ADMIN, APP, LOCAL_ROLES, OPERATOR
from handlers import batch_intake, command_message, expiry_sweep, onboarding
from handlers.records import BatchSettings

ROOT = Path(__file__).resolve().parents[1]
BICEP = (ROOT / "infra" / "resources.bicep").read_text()
MAIN = (ROOT / "infra" / "main.bicep").read_text()
PRINCIPALS = {"app": APP, "operator": OPERATOR, "admin": ADMIN}


def _assignments() -> set[tuple[str, str, str]]:
    rows = re.findall(r"\{ principal: '(\w+)', role: '([^']+)', scope: '([^']+)' \}", BICEP)
    assert rows, "infra/resources.bicep has no assignments table"
    assert len(rows) == len(set(rows)), "an assignment is listed twice"
    return {(PRINCIPALS[who], scope, role) for who, role, scope in rows}


def _block(start: str) -> str:
    """The text of the resource whose declaration line starts with ``start``, to its closing brace."""
    at = BICEP.index(start)
    end = BICEP.index("\n}\n", at)
    return BICEP[at:end]


def test_the_bicep_assigns_exactly_the_roles_the_local_stack_enforces_and_docs_deploy_md_grants():
    """emulators/stack.py LOCAL_ROLES is the role table (tests/test_deploy_roles.py holds docs/deploy.md to it)."""
    local = {(who, scope, role) for who, scopes in LOCAL_ROLES.items() for scope, roles in scopes.items()
             for role in roles}
    assert _assignments() == local


def test_every_scope_of_the_table_has_its_assignment_loop_and_every_role_an_id():
    scopes = {scope for _, scope, _ in _assignments()}
    looped = set(re.findall(r"filter\(active, x => x\.scope == '([^']+)'\)", BICEP))
    assert scopes == looped
    built_in = dict(re.findall(r"^  '?([A-Za-z ]+?)'?: '([0-9a-f-]{36})'$", BICEP, re.MULTILINE))
    for _, _, role in _assignments():
        assert role in built_in or role in CUSTOM_ROLES, role
        if role in built_in:
            assert role in BUILT_IN_ROLES, f"{role}: not a role the emulators know"
    # the GUIDs of the roles the app depends on, as Azure's built-in role list gives them
    assert built_in["Key Vault Crypto Officer"] == "14b46e9e-c2b7-41b4-b07b-48a6ebf60603"
    assert built_in["Device Provisioning Service Data Contributor"] == "dfce44e4-17b7-4bd1-a6d1-04996ec95633"
    assert built_in["IoT Hub Twin Contributor"] == "494bdba2-168f-4f31-a0a1-191d2f7c028c"


@pytest.mark.parametrize("symbol", ["rootKeySigner", "batchSecretsWriter"])
def test_the_custom_roles_grant_exactly_the_data_actions_the_emulators_enforce(symbol):
    block = _block(f"resource {symbol} ")
    name = re.search(r"guid\(resourceGroup\(\)\.id, '([^']+)'\)", block)[1]
    data_actions = re.findall(r"'(Microsoft\.KeyVault/[^']+)'", block)
    assert tuple(data_actions) == CUSTOM_ROLES[name].data_actions
    assert "actions: []" in block and "notDataActions: []" in block
    assert "assignableScopes: [resourceGroup().id]" in block


def test_the_app_settings_are_settings_the_app_reads_with_no_key_among_them():
    block = _block("resource app ")
    names = re.findall(r"\{ name: '([A-Za-z0-9_]+)', value:", block)
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{3,})"', (ROOT / "settings.py").read_text()))
    platform = {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId",
                "APPLICATIONINSIGHTS_CONNECTION_STRING", "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
                "PYTHON_ENABLE_OPENTELEMETRY", "EXPIRY_SWEEP_SCHEDULE"}
    assert set(names) <= read | platform, set(names) - read - platform
    for required in ("AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential", "AZURE_CLIENT_ID",
                     "KEY_VAULT_URL", "ROOT_CA_KEY_VAULT_URL", "DPS_INSTANCES", "EXPIRY_SWEEP_SCHEDULE"):
        assert required in names
    for keyed in ("DPS_CONNECTION_STRINGS", "IOT_HUB_CONNECTION_STRINGS", "AzureWebJobsStorage'", "AccountKey",
                  "listKeys(", "EMULATOR_CA_PATH", "LOCAL_KEYSTORE"):
        assert keyed not in block
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("\n## ", readme.index("## Settings") + 1)]
    unexplained = [n for n in names if f"`{n}`" not in table and f"`__{n.split('__')[-1]}`" not in table
                   and n != "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]
    assert unexplained == []


def test_keyless_storage_flex_consumption_by_identity_and_protected_vaults():
    storage = _block("resource storage ")
    assert "allowSharedKeyAccess: false" in storage and "allowBlobPublicAccess: false" in storage
    app = _block("resource app ")
    assert "authentication: { type: 'UserAssignedIdentity', userAssignedIdentityResourceId: identity.id }" in app
    assert "runtime: { name: 'python', version: '3.11' }" in app
    assert "maximumInstanceCount: maximumInstanceCount" in app and "param maximumInstanceCount int" in MAIN
    assert "DEPLOYMENT_STORAGE_CONNECTION_STRING" not in BICEP
    for vault in ("keyVault", "rootVault"):
        block = _block(f"resource {vault} ")
        assert "enableRbacAuthorization: true" in block and "enablePurgeProtection: true" in block
        assert "name: keyVaultSku" in block
    dps = _block("resource dps ")
    assert "authenticationType: 'UserAssigned'" in dps and "connectionString" not in dps
    assert "sku: { name: 'S1', capacity: 1 }" in _block("resource hub ")


def test_the_containers_and_queues_are_the_apps():
    containers = set(re.findall(r"blobServices/containers@[\w-]+' = \{\n  parent: blobService\n  name: '([a-z0-9-]+)'",
                                BICEP))
    batches = BatchSettings()
    assert containers == {"pki-state", batches.input_container, batches.results_container, batches.output_container,
                          "app-package"}
    queues = set(re.findall(r"queueServices/queues@[\w-]+' = \{\n  parent: queueService\n  name: '([a-z0-9-]+)'",
                            BICEP))
    assert queues == {onboarding.QUEUE, batch_intake.CHUNK_QUEUE, command_message.QUEUE, expiry_sweep.NOTICE_QUEUE}


def test_azd_deploys_the_app_and_subscribes_the_blob_trigger_after_it():
    azure = (ROOT / "azure.yaml").read_text()
    assert "host: function" in azure and "language: python" in azure
    assert "'azd-service-name': 'api'" in _block("resource app ")
    hook = (ROOT / "infra" / "hooks" / "postdeploy.sh").read_text()
    assert "functionName=Host.Functions.device_batch" in hook and "defaultHostName" in hook
    assert "azurewebsites.net" not in hook  # secure unique default host names: read it, never build it
    assert "Microsoft.EventGrid" in (ROOT / "infra" / "hooks" / "preprovision.sh").read_text()
    ignored = [line for line in (ROOT / ".funcignore").read_text().splitlines() if line and not line.startswith("#")]
    for shipped in ("function_app.py", "host.json", "requirements.txt", "settings.py", "pki", "handlers", "clients",
                    "edge"):
        assert shipped not in ignored


def test_names_fit_their_services_rules_with_the_13_character_token():
    """uniqueString() gives 13 characters: Key Vault names are 3-24 of letters, digits and '-' (Vaults_CreateOrUpdate),
    storage account names 3-24 lowercase letters and digits."""
    token = "a" * 13
    vaults = re.findall(r"resource \w+ 'Microsoft\.KeyVault/vaults@[\w-]+' = \{\n  name: '([a-z-]+)\$\{token\}'",
                        BICEP)
    assert len(vaults) == 2
    for prefix in vaults:
        assert re.fullmatch(r"[a-zA-Z0-9-]{3,24}", prefix + token), prefix
    storage = re.search(r"resource storage '[^']+' = \{\n  name: '([a-z0-9]+)\$\{token\}'", BICEP)[1]
    assert re.fullmatch(r"[a-z0-9]{3,24}", storage + token)
    assert "provisioningServices@2026-08-31" in BICEP  # the version Bicep's type library carries
