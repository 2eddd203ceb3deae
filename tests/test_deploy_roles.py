"""docs/deploy.md and the local stack assign the same roles: what the emulators enforce locally is what Azure
is told to grant. A role added to one and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

from emulators.rbac import BUILT_IN_ROLES
from emulators.stack import ADMIN, APP, LOCAL_ROLES, OPERATOR

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
PRINCIPALS = {"APP_PRINCIPAL": APP, "OPERATOR": OPERATOR, "ADMIN": ADMIN}
SCOPES = {"ST_ID": "storage", "KV_ID": "keyvault", "DPS_ID": "dps", "HUB_ID": "iothub"}


def _documented() -> set[tuple[str, str, str]]:
    grants = re.findall(r'^grant \$(\w+) (?:ServicePrincipal|User) "([^"]+)" \$(\w+)$', DEPLOY.read_text(), re.MULTILINE)
    assert grants, "docs/deploy.md has no `grant` lines"
    return {(PRINCIPALS[who], SCOPES[scope], role) for who, role, scope in grants}


def test_docs_deploy_md_grants_exactly_the_roles_the_local_stack_enforces():
    local = {(who, scope, role) for who, scopes in LOCAL_ROLES.items() for scope, roles in scopes.items()
             for role in roles}
    assert _documented() == local


def test_every_assigned_role_is_a_built_in_role_with_its_data_actions():
    for _, _, role in _documented():
        assert role in BUILT_IN_ROLES


def test_the_operator_holds_no_role_that_signs_and_tag_queries_need_more_than_blob_data_contributor():
    def allows(principal: str, action: str) -> bool:
        return any(BUILT_IN_ROLES[role].allows(action) for roles in LOCAL_ROLES[principal].values() for role in roles)

    assert not allows(OPERATOR, "Microsoft.KeyVault/vaults/keys/sign/action")
    assert not allows(OPERATOR, "Microsoft.KeyVault/vaults/keys/create/action")
    assert allows(OPERATOR, "Microsoft.KeyVault/vaults/secrets/getSecret/action")
    assert allows(OPERATOR, "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/filter/action")
    assert not BUILT_IN_ROLES["Storage Blob Data Contributor"].allows(
        "Microsoft.Storage/storageAccounts/blobServices/containers/blobs/filter/action")
