// `azd up`: the whole deployment of README "Running on Azure", in one resource group. Resources are in
// resources.bicep; this file makes the group and passes the parameters on.
targetScope = 'subscription'

@minLength(1)
@maxLength(32)
@description('azd environment name: names every resource (rg-{name}, and a token derived from it)')
param environmentName string

@minLength(1)
@description('Azure region of every resource')
param location string

@description('Object id of the Microsoft Entra group of operators (roles: README "Roles"); empty: none assigned')
param operatorGroupObjectId string = ''

@description('Object id of the Microsoft Entra group of PKI administrators; empty: none assigned')
param adminGroupObjectId string = ''

@allowed(['standard', 'premium'])
@description('Key Vault SKU of both vaults: premium allows HSM-backed keys')
param keyVaultSku string = 'standard'

@minValue(1)
@maxValue(1000)
@description('Flex Consumption maximumInstanceCount. Every instance that signs shares KEY_VAULT_SIGN_RATE_PER_S (one budget per vault for the whole app): more instances do not sign faster, they only divide the budget; keep it so that a 500-row chunk still finishes within functionTimeout (10 min) at budget / instances signs per second.')
param maximumInstanceCount int = 20

@minValue(1)
@maxValue(400)
@description('KEY_VAULT_SIGN_RATE_PER_S: the app\'s sign budget at each vault, all instances together (Key Vault allows 4,000 per 10 s per vault)')
param keyVaultSignRatePerSecond int = 100

resource group 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: { 'azd-env-name': environmentName }
}

module resources 'resources.bicep' = {
  name: 'iot-pki'
  scope: group
  params: {
    environmentName: environmentName
    location: location
    operatorGroupObjectId: operatorGroupObjectId
    adminGroupObjectId: adminGroupObjectId
    keyVaultSku: keyVaultSku
    maximumInstanceCount: maximumInstanceCount
    keyVaultSignRatePerSecond: keyVaultSignRatePerSecond
  }
}

output AZURE_RESOURCE_GROUP string = group.name
output PKI_FUNCTION_APP string = resources.outputs.functionAppName
output PKI_STORAGE_ACCOUNT string = resources.outputs.storageAccountName
output PKI_KEY_VAULT_URL string = resources.outputs.keyVaultUrl
output PKI_ROOT_KEY_VAULT_URL string = resources.outputs.rootKeyVaultUrl
output PKI_DPS_INSTANCES string = resources.outputs.dpsInstances
output PKI_EVENT_GRID_TOPIC string = resources.outputs.eventGridTopicName
