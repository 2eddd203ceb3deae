// Every resource of the deployment (docs/deploy.md makes the same with `az`). tests/test_infra.py checks this file
// against the app: the role assignments equal the local stack's (emulators/stack.py LOCAL_ROLES, which
// tests/test_deploy_roles.py checks against docs/deploy.md's table), the custom roles' data actions equal what the
// Key Vault emulators enforce, the app settings are settings the app reads, and the containers and queues are the
// app's. No Bicep compiler is installable from the package registries the project builds from, so nothing here is
// compiled by the tests.

param environmentName string
param location string
param operatorGroupObjectId string
param adminGroupObjectId string
param keyVaultSku string
param maximumInstanceCount int
param keyVaultSignRatePerSecond int

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var tags = { 'azd-env-name': environmentName }

// --- identities ---------------------------------------------------------------------------------------------------
// The app's user-assigned identity (it outlives the app; its roles exist before the app first starts).
resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-iot-pki-${token}'
  location: location
  tags: tags
}

// DPS reaches the hub with an identity of its own, not a hub key (linked hub authenticationType UserAssigned).
resource dpsIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-iot-pki-dps-${token}'
  location: location
  tags: tags
}

// --- storage: no shared key; containers and queues the people's roles are scoped to ------------------------------
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: 'stiotpki${token}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowSharedKeyAccess: false // every client, the Functions host and the deployment included, uses an identity
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource stateContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'pki-state'
}

resource batchesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'device-batches'
}

resource resultsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'device-batches-results'
}

resource certificatesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'device-certificates'
}

// Flex Consumption's deployment package, read with the app's identity (functionAppConfig.deployment below)
resource packageContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'app-package'
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource onboardingQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'customer-onboarding'
}

resource chunksQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'batch-chunks'
}

resource commandsQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'pki-commands'
}

resource noticesQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: 'certificate-expiry-notices'
}

// --- Key Vault: two vaults, RBAC, purge protection; the root key alone in its own (README "The root key apart") ---
resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: 'kv-pki-${token}'
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: keyVaultSku }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
  }
}

resource rootVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: 'kv-pkiroot-${token}' // Key Vault names: 3-24 characters
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: keyVaultSku }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
  }
}

// --- IoT Hub S1 and DPS, linked by DPS's identity -------------------------------------------------------------------
resource hub 'Microsoft.Devices/IotHubs@2023-06-30' = {
  name: 'hub-iot-pki-${token}'
  location: location
  tags: tags
  sku: { name: 'S1', capacity: 1 }
  properties: {}
}

resource dpsOnHub 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: hub
  name: guid(hub.id, dpsIdentity.id, 'IoT Hub Data Contributor')
  properties: {
    principalId: dpsIdentity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', builtInRoles['IoT Hub Data Contributor'])
  }
}

resource dps 'Microsoft.Devices/provisioningServices@2026-08-31' = {
  name: 'dps-iot-pki-${token}'
  location: location
  tags: tags
  sku: { name: 'S1', capacity: 1 }
  identity: { type: 'UserAssigned', userAssignedIdentities: { '${dpsIdentity.id}': {} } }
  properties: {
    iotHubs: [
      {
        hostName: hub.properties.hostName
        location: location
        authenticationType: 'UserAssigned'
        selectedUserAssignedIdentityResourceId: dpsIdentity.id
        applyAllocationPolicy: true
        allocationWeight: 1
      }
    ]
  }
  dependsOn: [dpsOnHub]
}

// --- Application Insights ---------------------------------------------------------------------------------------------
resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-iot-pki-${token}'
  location: location
  tags: tags
  properties: { sku: { name: 'PerGB2018' }, retentionInDays: 30 }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-iot-pki-${token}'
  location: location
  tags: tags
  kind: 'web'
  properties: { Application_Type: 'web', WorkspaceResourceId: workspace.id }
}

// --- the Function App: Flex Consumption, Python 3.11, everything by its user-assigned identity -------------------
resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-iot-pki-${token}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

var dpsInstances = string([
  {
    name: 'dps1'
    endpoint: 'https://${dps.properties.serviceOperationsHostName}'
    idScope: dps.properties.idScope
    iotHubs: [hub.properties.hostName]
    resourceId: dps.id
  }
])

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: 'func-iot-pki-${token}'
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: { type: 'UserAssigned', userAssignedIdentities: { '${identity.id}': {} } }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identity.id // Key Vault references (DPS_ALLOCATION_WEBHOOK_URL, docs/deploy.md step 8)
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${packageContainer.name}'
          authentication: { type: 'UserAssignedIdentity', userAssignedIdentityResourceId: identity.id }
        }
      }
      scaleAndConcurrency: { maximumInstanceCount: maximumInstanceCount, instanceMemoryMB: 2048 }
      runtime: { name: 'python', version: '3.11' }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identity.properties.clientId }
        { name: 'AZURE_CLIENT_ID', value: identity.properties.clientId }
        { name: 'KEY_VAULT_URL', value: keyVault.properties.vaultUri }
        { name: 'ROOT_CA_KEY_VAULT_URL', value: rootVault.properties.vaultUri }
        { name: 'KEY_VAULT_SIGN_RATE_PER_S', value: string(keyVaultSignRatePerSecond) }
        { name: 'KEY_VAULT_KEY_PROTECTION', value: keyVaultSku == 'premium' ? 'hsm' : 'software' }
        { name: 'DPS_INSTANCES', value: dpsInstances }
        { name: 'EXPIRY_SWEEP_SCHEDULE', value: '0 0 2 * * *' }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identity.properties.clientId};Authorization=AAD' }
        { name: 'PYTHON_ENABLE_OPENTELEMETRY', value: 'true' }
      ]
    }
  }
  dependsOn: [appRolesOnStorage] // the host reaches AzureWebJobsStorage by identity from its first start
}

// The blob trigger is Event Grid-sourced: the storage account's system topic here, its subscription to the app's
// blobs extension webhook in infra/hooks/postdeploy.sh (the webhook's system key exists only once the app runs).
resource blobEvents 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: 'evgt-iot-pki-${token}'
  location: location
  tags: tags
  properties: { source: storage.id, topicType: 'Microsoft.Storage.StorageAccounts' }
}

// --- roles: README "Roles" (docs/deploy.md step 2), for the app, the operators' group and the administrators' group
var builtInRoles = {
  Reader: 'acdd72a7-3385-48ef-bd42-f606fba81ae7'
  Contributor: 'b24988ac-6180-42a0-ab88-20f7382dd24c'
  'Storage Account Contributor': '17d1049b-9a84-46fb-8f53-869881c3d3ab'
  'Storage Blob Data Owner': 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  'Storage Blob Data Contributor': 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  'Storage Blob Data Reader': '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  'Storage Queue Data Contributor': '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  'Storage Table Data Contributor': '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  'Key Vault Crypto Officer': '14b46e9e-c2b7-41b4-b07b-48a6ebf60603'
  'Key Vault Reader': '21090545-7ca7-4776-b22c-e363652d74d2'
  'Key Vault Secrets User': '4633458b-17de-408a-b874-0445c86b69e6'
  'Device Provisioning Service Data Contributor': 'dfce44e4-17b7-4bd1-a6d1-04996ec95633'
  'Device Provisioning Service Data Reader': '10745317-c249-44a1-a5ce-3a4353c0bbd8'
  'IoT Hub Registry Contributor': '4ea46cd5-c1b2-4a8e-910b-273211f9ce47'
  'IoT Hub Twin Contributor': '494bdba2-168f-4f31-a0a1-191d2f7c028c'
  'IoT Hub Data Contributor': '4fc6c259-987e-4a07-842e-c321cc9d413f'
  'Monitoring Metrics Publisher': '3913510d-42f4-4e42-8a64-420c390055eb'
}

// The two custom roles (docs/deploy.md "Custom roles"): exactly these data actions, nothing else.
resource rootKeySigner 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'PKI Root Key Signer')
  properties: {
    roleName: 'PKI Root Key Signer ${token}'
    description: 'Read the root CA key\'s public half and sign with it. Nothing else.'
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.KeyVault/vaults/keys/read'
          'Microsoft.KeyVault/vaults/keys/sign/action'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [resourceGroup().id]
  }
}

resource batchSecretsWriter 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'PKI Batch Secrets Writer')
  properties: {
    roleName: 'PKI Batch Secrets Writer ${token}'
    description: 'Set a secret (a new version) and read a secret\'s value. No delete, purge, backup or list.'
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.KeyVault/vaults/secrets/setSecret/action'
          'Microsoft.KeyVault/vaults/secrets/getSecret/action'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [resourceGroup().id]
  }
}

var roleIds = union(builtInRoles, {
  'PKI Root Key Signer': rootKeySigner.name
  'PKI Batch Secrets Writer': batchSecretsWriter.name
})

// principal: app (the app's identity), operator, admin (the groups given as parameters); scope: as in
// emulators/stack.py LOCAL_ROLES. One row per assignment.
var assignments = [
  { principal: 'app', role: 'Storage Account Contributor', scope: 'storage' }
  { principal: 'app', role: 'Storage Blob Data Owner', scope: 'storage' }
  { principal: 'app', role: 'Storage Queue Data Contributor', scope: 'storage' }
  { principal: 'app', role: 'Storage Table Data Contributor', scope: 'storage' }
  { principal: 'app', role: 'Key Vault Crypto Officer', scope: 'keyvault' }
  { principal: 'app', role: 'PKI Batch Secrets Writer', scope: 'keyvault' }
  { principal: 'app', role: 'PKI Root Key Signer', scope: 'rootvault' }
  { principal: 'app', role: 'Device Provisioning Service Data Contributor', scope: 'dps' }
  { principal: 'app', role: 'IoT Hub Registry Contributor', scope: 'iothub' }
  { principal: 'app', role: 'IoT Hub Twin Contributor', scope: 'iothub' }
  { principal: 'operator', role: 'Storage Blob Data Owner', scope: 'container:pki-state' }
  { principal: 'operator', role: 'Storage Blob Data Contributor', scope: 'container:device-batches' }
  { principal: 'operator', role: 'Storage Blob Data Reader', scope: 'container:device-certificates' }
  { principal: 'operator', role: 'Storage Queue Data Contributor', scope: 'queue:customer-onboarding' }
  { principal: 'operator', role: 'Storage Queue Data Contributor', scope: 'queue:pki-commands' }
  { principal: 'operator', role: 'Key Vault Reader', scope: 'keyvault' }
  { principal: 'operator', role: 'Key Vault Secrets User', scope: 'keyvault' }
  { principal: 'operator', role: 'Key Vault Reader', scope: 'rootvault' }
  { principal: 'operator', role: 'Reader', scope: 'dps' }
  { principal: 'operator', role: 'Device Provisioning Service Data Reader', scope: 'dps' }
  { principal: 'admin', role: 'Storage Blob Data Owner', scope: 'container:pki-state' }
  { principal: 'admin', role: 'Storage Queue Data Contributor', scope: 'queue:certificate-expiry-notices' }
  { principal: 'admin', role: 'Key Vault Crypto Officer', scope: 'keyvault' }
  { principal: 'admin', role: 'Key Vault Crypto Officer', scope: 'rootvault' }
  { principal: 'admin', role: 'Device Provisioning Service Data Contributor', scope: 'dps' }
  { principal: 'admin', role: 'Contributor', scope: 'dps' }
]

// The groups are optional: their rows are left out when no group is given. The two groups must differ (their
// assignments on pki-state would otherwise be one assignment twice).
var active = filter(assignments, a => a.principal == 'app' || (a.principal == 'operator' && !empty(operatorGroupObjectId)) || (a.principal == 'admin' && !empty(adminGroupObjectId)))
var principalIds = { operator: operatorGroupObjectId, admin: adminGroupObjectId }

resource appRolesOnStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'storage'): {
  scope: storage
  name: guid(storage.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: a.principal == 'app' ? identity.properties.principalId : principalIds[a.principal]
    principalType: a.principal == 'app' ? 'ServicePrincipal' : 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnStateContainer 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'container:pki-state'): {
  scope: stateContainer
  name: guid(stateContainer.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnBatchesContainer 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'container:device-batches'): {
  scope: batchesContainer
  name: guid(batchesContainer.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnCertificatesContainer 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'container:device-certificates'): {
  scope: certificatesContainer
  name: guid(certificatesContainer.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnOnboardingQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'queue:customer-onboarding'): {
  scope: onboardingQueue
  name: guid(onboardingQueue.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnCommandsQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'queue:pki-commands'): {
  scope: commandsQueue
  name: guid(commandsQueue.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnNoticesQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'queue:certificate-expiry-notices'): {
  scope: noticesQueue
  name: guid(noticesQueue.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: principalIds[a.principal]
    principalType: 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnKeyVault 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'keyvault'): {
  scope: keyVault
  name: guid(keyVault.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: a.principal == 'app' ? identity.properties.principalId : principalIds[a.principal]
    principalType: a.principal == 'app' ? 'ServicePrincipal' : 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnRootVault 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'rootvault'): {
  scope: rootVault
  name: guid(rootVault.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: a.principal == 'app' ? identity.properties.principalId : principalIds[a.principal]
    principalType: a.principal == 'app' ? 'ServicePrincipal' : 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnDps 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'dps'): {
  scope: dps
  name: guid(dps.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: a.principal == 'app' ? identity.properties.principalId : principalIds[a.principal]
    principalType: a.principal == 'app' ? 'ServicePrincipal' : 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

resource rolesOnHub 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for a in filter(active, x => x.scope == 'iothub'): {
  scope: hub
  name: guid(hub.id, a.principal == 'app' ? identity.id : principalIds[a.principal], a.role)
  properties: {
    principalId: a.principal == 'app' ? identity.properties.principalId : principalIds[a.principal]
    principalType: a.principal == 'app' ? 'ServicePrincipal' : 'Group'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[a.role])
  }
}]

// Application Insights with Microsoft Entra authentication (APPLICATIONINSIGHTS_AUTHENTICATION_STRING above)
resource appOnInsights 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: insights
  name: guid(insights.id, 'app', 'Monitoring Metrics Publisher')
  properties: {
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', builtInRoles['Monitoring Metrics Publisher'])
  }
}

output functionAppName string = app.name
output storageAccountName string = storage.name
output keyVaultUrl string = keyVault.properties.vaultUri
output rootKeyVaultUrl string = rootVault.properties.vaultUri
output dpsInstances string = dpsInstances
output eventGridTopicName string = blobEvents.name
