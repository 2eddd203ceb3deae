#!/bin/sh
# azd postdeploy: the Event Grid subscription of the Event Grid-sourced blob trigger `device_batch`. It needs the
# blobs extension's system key, which exists only once the deployed app has started, so it cannot be in the Bicep.
# https://learn.microsoft.com/azure/azure-functions/functions-event-grid-blob-trigger (the webhook URL's form).
set -eu
az account set --subscription "$AZURE_SUBSCRIPTION_ID"  # azd's subscription, not az's default
RG="$AZURE_RESOURCE_GROUP"
APP="$PKI_FUNCTION_APP"
HOST=$(az functionapp show --name "$APP" --resource-group "$RG" --query properties.defaultHostName -o tsv)
KEY=""
for attempt in 1 2 3 4 5 6 7 8 9 10; do  # the host creates its system keys when it first starts
  KEY=$(az functionapp keys list --name "$APP" --resource-group "$RG" --query systemKeys.blobs_extension -o tsv || true)
  [ -n "$KEY" ] && break
  sleep 15
done
[ -n "$KEY" ] || { echo "no blobs_extension system key on $APP yet: run 'azd hooks run postdeploy' again" >&2; exit 1; }
az eventgrid system-topic event-subscription create --name device-batches --resource-group "$RG" \
  --system-topic-name "$PKI_EVENT_GRID_TOPIC" \
  --endpoint "https://$HOST/runtime/webhooks/blobs?functionName=Host.Functions.device_batch&code=$KEY" \
  --included-event-types Microsoft.Storage.BlobCreated \
  --subject-begins-with /blobServices/default/containers/device-batches/ --output none
echo "Event Grid: BlobCreated in device-batches -> $APP (device_batch)"
