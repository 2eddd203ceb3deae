#!/bin/sh
# azd preprovision: resource providers a new subscription may not have registered yet. Event Grid's is needed by the
# blob trigger's system topic, and is the one most often missing.
set -eu
az account set --subscription "$AZURE_SUBSCRIPTION_ID"  # azd's subscription, not az's default
for namespace in Microsoft.EventGrid Microsoft.Devices Microsoft.KeyVault Microsoft.Web Microsoft.Storage \
                 Microsoft.Insights Microsoft.OperationalInsights Microsoft.ManagedIdentity; do
  az provider register --namespace "$namespace" --wait --output none
done
