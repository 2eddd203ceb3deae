"""docs/deploy.md and the local stack assign the same roles: what the emulators enforce locally is what Azure
is told to grant. A role added to one and not the other fails here, and so does a custom role whose JSON in the
docs differs from the definition the Key Vault emulators enforce."""

from __future__ import annotations

import json
import re
from pathlib import Path

from emulators.rbac import BUILT_IN_ROLES, CUSTOM_ROLES, ROLES
from emulators.stack import ADMIN, APP, LOCAL_ROLES, OPERATOR

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
PRINCIPALS = {"APP_PRINCIPAL": APP, "OPERATOR": OPERATOR, "ADMIN": ADMIN}
SCOPES = {"ST_ID": "storage", "KV_ID": "keyvault", "ROOT_KV_ID": "rootvault", "DPS_ID": "dps", "HUB_ID": "iothub"}
KV = "Microsoft.KeyVault/vaults"


def _text() -> str:
    return DEPLOY.read_text()


def _scopes() -> dict[str, str]:
    """Scope variables: the resources', and those docs/deploy.md defines as one container or queue of $ST_ID."""
    scopes = dict(SCOPES)
    for variable, kind, name in re.findall(r"^(\w+)=\$ST_ID/(blob|queue)Services/default/(?:containers|queues)/"
                                           r"([a-z0-9-]+)$", _text(), re.MULTILINE):
        scopes[variable] = f"{'container' if kind == 'blob' else 'queue'}:{name}"
    return scopes


def _documented() -> set[tuple[str, str, str]]:
    grants = re.findall(r'^grant \$(\w+) (?:ServicePrincipal|User) "([^"]+)" \$(\w+)$', _text(), re.MULTILINE)
    assert grants, "docs/deploy.md has no `grant` lines"
    scopes = _scopes()
    return {(PRINCIPALS[who], scopes[scope], role) for who, role, scope in grants}


def _local() -> set[tuple[str, str, str]]:
    return {(who, scope, role) for who, scopes in LOCAL_ROLES.items() for scope, roles in scopes.items()
            for role in roles}


def _custom_role_documents() -> dict[str, dict]:
    """The JSON `az role definition create` is given in docs/deploy.md (`cat > FILE.json <<EOF ... EOF`)."""
    blocks = re.findall(r"^cat > [\w.-]+\.json <<EOF\n(.*?)^EOF$", _text(), re.MULTILINE | re.DOTALL)
    documents = [json.loads(block) for block in blocks]
    return {document["Name"]: document for document in documents}


def test_docs_deploy_md_grants_exactly_the_roles_the_local_stack_enforces():
    assert _documented() == _local()


def test_every_assigned_role_is_a_built_in_role_or_a_custom_role_the_docs_define():
    documented = _custom_role_documents()
    for _, _, role in _documented():
        assert role in ROLES
        if role not in BUILT_IN_ROLES:
            assert role in documented, f"{role}: a custom role docs/deploy.md does not define"


def test_the_custom_roles_json_in_the_docs_is_exactly_what_the_emulators_enforce():
    documented = _custom_role_documents()
    assert set(documented) == set(CUSTOM_ROLES)
    for name, document in documented.items():
        role = CUSTOM_ROLES[name]
        assert document["IsCustom"] is True
        assert sorted(document["DataActions"]) == sorted(role.data_actions), name
        assert document["Actions"] == list(role.actions) == [] and document["NotActions"] == []
        assert document["NotDataActions"] == []  # Azure subtracts them; the emulator's roles have none
        assert document["AssignableScopes"] == ["$RG_ID"]


def test_the_app_can_only_read_and_sign_with_the_root_key_and_never_purge_a_secret():
    def app_allows(resource: str, action: str) -> bool:
        return any(ROLES[role].allows(action) for role in LOCAL_ROLES[APP][resource])

    for action in ("keys/read", "keys/sign/action"):
        assert app_allows("rootvault", f"{KV}/{action}")
    for action in ("keys/create/action", "keys/delete", "keys/backup/action", "keys/update/action", "keys/purge/action",
                   "keys/rotate/action", "keys/encrypt/action", "keys/decrypt/action", "keys/wrap/action",
                   "keys/import/action", "keys/release/action", "secrets/setSecret/action",
                   "secrets/getSecret/action"):
        assert not app_allows("rootvault", f"{KV}/{action}"), action
    assert app_allows("keyvault", f"{KV}/keys/create/action")  # customers' intermediates
    for action in ("secrets/setSecret/action", "secrets/getSecret/action"):
        assert app_allows("keyvault", f"{KV}/{action}")
    for action in ("secrets/delete", "secrets/purge/action", "secrets/backup/action", "secrets/readMetadata/action"):
        assert not app_allows("keyvault", f"{KV}/{action}"), action
    # the root key is made by the PKI administrator, in the root vault
    assert any(ROLES[role].allows(f"{KV}/keys/create/action") for role in LOCAL_ROLES[ADMIN]["rootvault"])


def test_people_storage_roles_are_scoped_to_containers_and_queues_and_only_the_app_holds_the_account():
    for principal in (OPERATOR, ADMIN):
        storage = [scope for scope in LOCAL_ROLES[principal] if scope not in ("keyvault", "rootvault", "dps", "iothub")]
        assert storage and all(scope.startswith(("container:", "queue:")) for scope in storage), principal
    assert {scope for _, scope, _ in _documented()} >= {"storage", "container:pki-state", "queue:pki-commands"}


def test_the_operator_holds_no_role_that_signs_and_tag_queries_need_more_than_blob_data_contributor():
    def allows(principal: str, action: str) -> bool:
        return any(ROLES[role].allows(action) for roles in LOCAL_ROLES[principal].values() for role in roles)

    assert not allows(OPERATOR, "Microsoft.KeyVault/vaults/keys/sign/action")
    assert not allows(OPERATOR, "Microsoft.KeyVault/vaults/keys/create/action")
    assert allows(OPERATOR, "Microsoft.KeyVault/vaults/secrets/getSecret/action")
    assert allows(OPERATOR, "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/filter/action")
    assert not BUILT_IN_ROLES["Storage Blob Data Contributor"].allows(
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/filter/action")
