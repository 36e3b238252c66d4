# grpcurl cases, sourced by run.sh: `case_ NAME EXIT PATTERN... -- ARGS...` ($addr is the gateway).

case_ "list shows every service, health and reflection" 0 \
  '^cx\.gateway\.v1\.CustomerService$' '^cx\.gateway\.v1\.SurveyService$' \
  '^cx\.gateway\.v1\.EventService$' '^cx\.gateway\.v1\.FeedbackStream$' \
  '^cx\.gateway\.v1\.DeliveryService$' '^grpc\.health\.v1\.Health$' \
  '^grpc\.reflection\.v1alpha\.ServerReflection$' -- "$addr" list

for service in CustomerService SurveyService EventService FeedbackStream DeliveryService; do
  case_ "describe $service" 0 "service $service" -- "$addr" describe "cx.gateway.v1.$service"
done

case_ "overall health is SERVING" 0 '"status": "SERVING"' -- \
  -d '{"service": ""}' "$addr" grpc.health.v1.Health/Check
case_ "per-service health is SERVING" 0 '"status": "SERVING"' -- \
  -d '{"service": "cx.gateway.v1.SurveyService"}' "$addr" grpc.health.v1.Health/Check

# DeliveryService
case_ "ListDeadLetters starts empty" 0 '"totalSize": "0"' -- \
  -d '{"page_size": 10}' "$addr" cx.gateway.v1.DeliveryService/ListDeadLetters
case_ "GetDelivery of an unknown id is NOT_FOUND" 69 'Code: NotFound' 'DELIVERY_NOT_FOUND' -- \
  -d '{"delivery_id": "dlv_unknown"}' "$addr" cx.gateway.v1.DeliveryService/GetDelivery
case_ "RetryDeadLetters with bad input is INVALID_ARGUMENT with field violations" 67 \
  'Code: InvalidArgument' 'INVALID_FIELDS' '"field":"delivery_ids\[1\]"' -- \
  -d '{"delivery_ids": ["dlv_a", "dlv_a"]}' "$addr" cx.gateway.v1.DeliveryService/RetryDeadLetters

# EventService
case_ "ListEventMappings answers (none configured by default)" 0 '"totalSize": "0"' -- \
  -d '{}' "$addr" cx.gateway.v1.EventService/ListEventMappings
case_ "TrackEvent records an event at Retainly" 0 '"duplicate": false' -- \
  -d '{"event": {"customer_id": "grpcurl-1", "name": "grpcurl_event", "message_id": "grpcurl-msg-1"}}' \
  "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent with the same message id is a duplicate" 0 '"duplicate": true' -- \
  -d '{"event": {"customer_id": "grpcurl-1", "name": "grpcurl_event", "message_id": "grpcurl-msg-1"}}' \
  "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent with bad input names the fields" 67 'INVALID_FIELDS' '"field":"event.customer_id"' \
  '"field":"event.name"' -- -d '{"event": {"name": ""}}' "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvents (client stream) counts events" 0 '"acceptedCount": "2"' -- \
  -d '{"events": [{"customer_id": "g2", "name": "bulk"}]} {"events": [{"customer_id": "g3", "name": "bulk"}]}' \
  "$addr" cx.gateway.v1.EventService/TrackEvents
